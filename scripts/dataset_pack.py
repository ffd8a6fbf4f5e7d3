#!/usr/bin/env python3
"""Pack the rendered avatar data set into one small file, and unpack it elsewhere.

The 20,000 PNGs of scripts/avatars/render.mjs are 55 MB as files, too much to carry to a GPU
machine (the device tool moves 64 MiB per call, the sd-rs binary included) that has no Node.js
to render them again. As one uint8 array compressed with xz they are about 14 MB: the avatars
share most of their pixels. Unpacking writes the same PNG pixels, data.jsonl and
attributes.jsonl, so `sd-rs train` reads the same data set.

    python3 scripts/dataset_pack.py pack ~/sd-rs-runs/avatars dist/avatars.pack
    python3 scripts/dataset_pack.py unpack dist/avatars.pack /tmp/avatars

Needs numpy and Pillow only.
"""

import argparse
import json
import lzma
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

MAGIC = b"SDRSPAK1"


def pack(src, dest):
    rows = [json.loads(line) for line in open(os.path.join(src, "data.jsonl"))]
    names = [r["file_name"] for r in rows]
    pixels = np.stack([np.asarray(Image.open(os.path.join(src, n)).convert("RGB")) for n in names])
    texts = {}
    for name in ("data.jsonl", "attributes.jsonl", "ATTRIBUTION.txt"):
        path = os.path.join(src, name)
        if os.path.exists(path):
            texts[name] = open(path, "rb").read()
    header = json.dumps({"shape": list(pixels.shape), "files": names,
                         "texts": {k: len(v) for k, v in texts.items()}}).encode()
    body = lzma.compress(header + pixels.tobytes() + b"".join(texts.values()), preset=6)
    tmp = dest + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + body)
    os.replace(tmp, dest)
    print(f"packed {len(names)} images into {dest} ({os.path.getsize(dest) / 1e6:.1f} MB)")


def unpack(src, dest):
    data = open(src, "rb").read()
    if data[:8] != MAGIC:
        sys.exit(f"{src} is not a packed data set (made by `dataset_pack.py pack`)")
    (header_len,) = struct.unpack("<Q", data[8:16])
    raw = lzma.decompress(data[16:])
    header = json.loads(raw[:header_len])
    shape = header["shape"]
    n_pixels = int(np.prod(shape))
    pixels = np.frombuffer(raw, np.uint8, n_pixels, header_len).reshape(shape)
    offset = header_len + n_pixels
    for name, length in header["texts"].items():
        with open(os.path.join(dest, name), "wb") as f:
            f.write(raw[offset:offset + length])
        offset += length

    def write(i):
        path = os.path.join(dest, header["files"][i])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels[i]).save(path)

    os.makedirs(dest, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, range(len(pixels))))
    print(f"unpacked {len(pixels)} images into {dest}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="data set folder -> one file")
    p.add_argument("src")
    p.add_argument("dest")
    u = sub.add_parser("unpack", help="one file -> data set folder")
    u.add_argument("src")
    u.add_argument("dest")
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(args.src, args.dest)
    else:
        os.makedirs(args.dest, exist_ok=True)
        unpack(args.src, args.dest)


if __name__ == "__main__":
    main()
