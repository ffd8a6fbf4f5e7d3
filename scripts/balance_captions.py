#!/usr/bin/env python3
"""Writes a data.jsonl in which rare attribute values are repeated, so that training sees them
more often (the trainer shuffles; a repeated line is just one more draw of that image).

    scripts/balance_captions.py runs/avatars2 --by glasses --times glasses=2,sunglasses=4 \
        --out runs/avatars2/data-eyewear.jsonl

Reads DIR/attributes.jsonl (written by scripts/avatars/render.mjs) and keeps each line's
file_name and text; the output must sit in DIR, since file names are relative to it.
"""
import argparse
import collections
import json
import pathlib
import sys


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=pathlib.Path, help="data set folder with attributes.jsonl")
    p.add_argument("--by", required=True, help="attribute to balance, e.g. glasses")
    p.add_argument("--times", required=True, help="VALUE=N,... how often each value's images appear")
    p.add_argument("--out", type=pathlib.Path, required=True)
    args = p.parse_args()

    times = {}
    for item in args.times.split(","):
        value, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            sys.exit(f"--times: '{item}' is not VALUE=N with N >= 1")
        times[value] = int(n)
    if args.out.resolve().parent != args.dir.resolve():
        sys.exit(f"--out must be in {args.dir}: file names in the captions are relative to it")

    lines, counts = [], collections.Counter()
    with open(args.dir / "attributes.jsonl") as f:
        for number, line in enumerate(f, 1):
            row = json.loads(line)
            if args.by not in row:
                sys.exit(f"{args.dir}/attributes.jsonl:{number}: no attribute '{args.by}'")
            n = times.get(row[args.by], 1)
            counts[row[args.by]] += n
            lines += [json.dumps({"file_name": row["file_name"], "text": row["text"]})] * n
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    total = sum(counts.values())
    shares = ", ".join(f"{v} {c / total:.0%}" for v, c in counts.most_common())
    print(f"{args.out}: {total} lines ({shares})")


if __name__ == "__main__":
    main()
