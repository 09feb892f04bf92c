#!/usr/bin/env python3
"""Rewrite section references in the given files to docs/semantics.md numbering.

Usage: python3 scripts/respec.py [--dry-run] [--force] FILE...

The crate was first written against notes that do not ship with it. Their
section numbers (`§3.16.7`), the file name of those notes, "spec §" and the
design-note names (BRIEF, VERIFY) are rewritten here:

  §3.16.7, §3.1-§3.8, §3.13-3.16.7, §3.20.2/3   -> numbers from scripts/spec_map.tsv
  spec §3.6                                     -> semantics.md §4.6
  spec L1 / spec notation                        -> semantics.md L1 / semantics.md notation
  kernel-semantics.md                           -> docs/semantics.md (semantics.md under docs/)
  BRIEF hazard N / BRIEF §3                     -> hazard N / semantics.md §14
  BRIEF §4 (skiplist rules) / BRIEF §5 (workloads) -> protocols.md §g / docs/benchmarks.md
  VERIFY tier T3 / VERIFY.md tiers T6, T7       -> tier T3 / tiers T6, T7 (README.md, "Verification")

`§` followed by a letter (protocols.md's own sections), and `architecture.md §N`
(its own numbered sections), are left alone.

The rewrite is one-shot: running it twice on a file would renumber the new
numbers again. A file that already cites a number only the new numbering has
(§6.x, §8.x, §9 and above, or "semantics.md §") is skipped unless --force.
Prints, per file, how many references it rewrote, and warns about any
numbered `§` it does not know.
"""

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def load_map():
    m = {}
    with open(os.path.join(HERE, "spec_map.tsv"), encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            old, new = line.rstrip("\n").split("\t")[:2]
            m[old] = new
    return m


NUM = r"\d+(?:\.\d+)*"
# One reference: §N.N, optionally followed by a range end (-N.N or -§N.N,
# also with an en dash) and/or sibling shorthands (/3).
REF = re.compile(r"§(" + NUM + r")((?:\s*[-–]\s*§?" + NUM + r")?)((?:/\d+)*)")
NEW_ONLY = re.compile(r"semantics\.md §|§(?:[6-8]\.\d|9\b|1[0-5]\b|1[0-5]\.\d)")


def rewrite(text, mapping, in_docs, unknown):
    count = 0

    def map_one(old):
        new = mapping.get(old)
        if new is None:
            unknown.add(old)
            return old
        return new

    def ref(m):
        nonlocal count
        # architecture.md has its own numbered sections: leave its references.
        if re.search(r"architecture(?:\.md)?[,:]?\s*$", m.string[max(0, m.start() - 24):m.start()]):
            return m.group(0)
        count += 1
        first, rng, sib = m.group(1), m.group(2), m.group(3)
        out = "§" + map_one(first)
        if rng:
            end = re.search(NUM, rng).group(0)
            prefix = rng[: rng.index(end)]
            out += prefix + map_one(end)
        for s in sib.split("/")[1:]:
            parent = first.rsplit(".", 1)[0]
            new_sib = map_one(parent + "." + s)
            new_first = map_one(first)
            if new_sib.rsplit(".", 1)[0] == new_first.rsplit(".", 1)[0] and "." in new_sib:
                out += "/" + new_sib.rsplit(".", 1)[1]
            else:
                out += "/§" + new_sib
        return out

    # Names of notes that do not ship.
    text, n = re.subn(r"(?i:BRIEF)\s+§\s*3\b", "\0HAZARDS\0", text)
    count += n
    # The other design-note sections: crossbeam-skiplist's sharp edges (now
    # protocols.md §g, "The crossbeam-skiplist 0.1.3 rules") and the
    # benchmark workloads (defined in docs/benchmarks.md).
    text, n = re.subn(r"The rules from (?i:BRIEF)\s+§\s*4\b", "The crossbeam-skiplist 0.1.3 rules", text)
    count += n
    text, n = re.subn(r"(?i:BRIEF)\s+§\s*4\b", "\0SKIPLIST\0", text)
    count += n
    text, n = re.subn(r"\s*\((?i:BRIEF)\s+§\s*5\)", "", text)
    count += n
    text, n = re.subn(r"(?:the\s+)?(?i:BRIEF)\s+§\s*5\s+workloads", "the W1-W4 workloads (docs/benchmarks.md)", text)
    count += n
    text, n = re.subn(r"(?i:BRIEF)\s+(hazards?)", r"\1", text)
    count += n
    text, n = re.subn(r"VERIFY(?:\.md)?\s+(tiers?)\s+(T\d+\w?(?:(?:,\s*|\s*(?:and|/)\s*)T\d+\w?)*)",
                      r"\1 \2 (README.md, \"Verification\")", text)
    count += n
    target = "semantics.md" if in_docs else "docs/semantics.md"
    text, n = re.subn(r"(?:docs/)?kernel-semantics\.md", target, text)
    count += n
    # Numbered sections first, then the word "spec" in front of them.
    text = REF.sub(ref, text)
    text = text.replace("\0HAZARDS\0", "semantics.md §14")
    text = text.replace("\0SKIPLIST\0", "protocols.md §g, crossbeam-skiplist rules")
    text, n = re.subn(r"\bspec(\s+(?:(?://[/!]?|#|\*)\s*)?)(?=§|L\d|notation)", r"semantics.md\1", text)
    count += n
    return text, count


def main(argv):
    dry = "--dry-run" in argv
    force = "--force" in argv
    files = [a for a in argv if not a.startswith("--")]
    if not files:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    mapping = load_map()
    status = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if NEW_ONLY.search(text) and not force:
            print(f"{path}: already cites the new numbering; skipped (--force to rewrite anyway)")
            continue
        unknown = set()
        in_docs = os.path.normpath(path).split(os.sep)[0] == "docs" or "/docs/" in os.path.abspath(path)
        new, count = rewrite(text, mapping, in_docs, unknown)
        if unknown:
            print(f"{path}: WARNING: unknown section(s) left as they were: {', '.join(sorted(unknown))}")
            status = 1
        print(f"{path}: {count} reference(s) rewritten" + (" (dry run)" if dry else ""))
        if not dry and new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
