"""Generate ``tusou/embed/data/concepts.json``: the 1000 ImageNet classes of the shipped classifier as
WordNet 3.0 synsets, with their hypernym closure, English names and Chinese names.

    python tools/make_concepts.py [--cache ~/.cache/tusou-concepts]

Inputs (fetched into ``--cache`` with the ordinary clients when missing; nothing is installed):

- Debian's ``wordnet-base`` package (``apt-get download wordnet-base``): ``data.noun`` of WordNet 3.0 gives
  every synset's English lemmas and its hypernyms (``@`` and instance ``@i`` pointers). An ImageNet class
  id ``nXXXXXXXX`` is the WordNet 3.0 noun offset ``XXXXXXXX``. The package's copyright file is copied to
  ``tusou/embed/data/LICENSE-wordnet.txt`` (WordNet 3.0 licence, Princeton University).
- The ImageNet-1k class list, in the order of the classifier's outputs (the ids sorted, as every
  ImageNet-1k checkpoint including EfficientNet-Lite's uses): ``timm/data/_info/imagenet_synsets.txt``
  from the ``timm`` wheel (``pip download timm --no-deps``; Apache-2.0). Only the 1000 ids are read.
- Chinese names: ``tools/concepts_zh.tsv``, a list written and reviewed for tusou (no maintained package
  carries Chinese names for WordNet/ImageNet synsets offline). Each line: synset id, the English name
  (for the reviewer), then the Chinese names separated by ``/``. The tool refuses ids that are not in
  the closure and English names that do not match the synset.

Output (compact JSON, ``"n"`` = nodes, ``"c"`` = how many of the first nodes are the classifier's
classes, in output order): each node is ``[id, [English names], [Chinese names], [parent node indices]]``.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tusou" / "embed" / "data"
ZH = ROOT / "tools" / "concepts_zh.tsv"


def deb_member(deb: Path, wanted: set[str]) -> dict[str, bytes]:
    """Files of a .deb's data.tar.* (pure Python: ar + tar), by path without the leading './'."""
    out: dict[str, bytes] = {}
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SystemExit(f"not a .deb: {deb}")
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                raise SystemExit(f"no data.tar in {deb}")
            name = hdr[:16].decode().strip().rstrip("/")
            size = int(hdr[48:58].decode().strip())
            blob = f.read(size)
            f.read(size & 1)
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
                    for m in tf:
                        p = m.name.removeprefix("./")
                        if m.isfile() and p in wanted:
                            fh = tf.extractfile(m)
                            assert fh is not None
                            out[p] = fh.read()
                return out


def fetch(cache: Path) -> tuple[Path, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(glob.glob(str(cache / "wordnet-base_*.deb")))
    if not debs:
        subprocess.run(["apt-get", "download", "wordnet-base"], cwd=cache, check=True)
        debs = sorted(glob.glob(str(cache / "wordnet-base_*.deb")))
    wheels = sorted(glob.glob(str(cache / "timm-*.whl")))
    if not wheels:
        pip = [sys.executable, "-m", "pip", "download", "timm", "--no-deps", "-d", str(cache)]
        subprocess.run(pip, check=True)
        wheels = sorted(glob.glob(str(cache / "timm-*.whl")))
    return Path(debs[-1]), Path(wheels[-1])


def parse_data_noun(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """offset id -> (lemmas, hypernym ids) from WordNet's data.noun."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for line in text.splitlines():
        if line.startswith("  "):  # licence header
            continue
        head = line.split(" | ", 1)[0].split()
        off, _lex, _pos, wcnt = head[0], head[1], head[2], int(head[3], 16)
        words = [head[4 + 2 * i] for i in range(wcnt)]
        i = 4 + 2 * wcnt
        pcnt = int(head[i])
        parents = []
        for k in range(pcnt):
            sym, target, pos = head[i + 1 + 4 * k : i + 4 + 4 * k]
            if sym in ("@", "@i") and pos == "n":
                parents.append("n" + target)
        lemmas = []
        for w in words:
            w = re.sub(r"\([a-z]+\)$", "", w).replace("_", " ")  # adjective markers like (a)
            if w not in lemmas:
                lemmas.append(w)
        out["n" + off] = (lemmas, parents)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/tusou-concepts").expanduser())
    ap.add_argument("--list", metavar="WORD", help="print the nodes whose English names contain WORD, exit")
    args = ap.parse_args()
    deb, wheel = fetch(args.cache)
    files = deb_member(deb, {"usr/share/wordnet/data.noun", "usr/share/doc/wordnet-base/copyright"})
    wn = parse_data_noun(files["usr/share/wordnet/data.noun"].decode("utf-8"))
    with zipfile.ZipFile(wheel) as z:
        classes = z.read("timm/data/_info/imagenet_synsets.txt").decode().split()
    if len(classes) != 1000 or classes != sorted(classes):
        raise SystemExit("unexpected ImageNet class list")

    order = list(classes)
    seen = set(order)
    i = 0
    while i < len(order):
        for p in wn[order[i]][1]:
            if p not in seen:
                seen.add(p)
                order.append(p)
        i += 1
    # Ancestors after the classes, sorted by id so that the file diffs well.
    order = classes + sorted(order[len(classes) :])
    index = {s: k for k, s in enumerate(order)}

    if args.list:
        for s in order:
            if any(args.list in w for w in wn[s][0]):
                print(s, " / ".join(wn[s][0]), "| parents:", ", ".join(wn[p][0][0] for p in wn[s][1]))
        return

    zh: dict[str, list[str]] = {}
    for n, line in enumerate(ZH.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        sid, en, names = (c.strip() for c in line.split("\t"))
        if sid not in index:
            raise SystemExit(f"{ZH}:{n}: {sid} ({en}) is not a class or an ancestor of one")
        if en not in wn[sid][0]:
            raise SystemExit(f"{ZH}:{n}: {sid} is {wn[sid][0]}, not {en!r}")
        if sid in zh:
            raise SystemExit(f"{ZH}:{n}: {sid} listed twice")
        zh[sid] = [x.strip() for x in names.split("/") if x.strip()]

    nodes = [[s, wn[s][0], zh.get(s, []), [index[p] for p in wn[s][1] if p in index]] for s in order]
    doc = {
        "about": "ImageNet-1k classes (first c nodes, in classifier output order) and their WordNet 3.0 "
        "hypernym closure; node = [synset id, English names, Chinese names, parent node indices]. "
        "Generated by tools/make_concepts.py from Debian's wordnet-base "
        f"({deb.name}; licence in LICENSE-wordnet.txt) and tools/concepts_zh.tsv.",
        "c": len(classes),
        "n": nodes,
    }
    DATA.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    (DATA / "concepts.json").write_text(text + "\n", encoding="utf-8")
    (DATA / "LICENSE-wordnet.txt").write_bytes(files["usr/share/doc/wordnet-base/copyright"])
    print(
        f"wrote {DATA / 'concepts.json'}: {len(nodes)} nodes ({len(classes)} classes), "
        f"{sum(1 for x in nodes if x[2])} with Chinese names, {len(text) / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
