#!/usr/bin/env python3
"""Build tusou's retrieval evaluation sets from real photos that ship inside Debian packages.

    python bench/eval_build.py [--eval-dir ~/.cache/tusou-eval] [--sets semantic] [--jobs N]

Steps: ``apt-get download`` of the nine Debian 12 (bookworm) packages in ``PACKAGES`` into
``<eval-dir>/deb`` (601 MB, nothing is installed; files already there are kept), unpacking of the
photos in pure Python (ar + tar.xz + Qt .rcc, no dpkg, no root) into ``<eval-dir>/cache``, and the
sets under ``<eval-dir>/out``. ``bench/quality.py --build`` runs this. No network is used after the
download, and the images are never committed to the repository.

Sets written under OUT/ (each: gallery/, queries/, gallery.json, queries.json, gt.json):

  neardup/           copy detection: every query is an edited copy (crop, resize,
                     JPEG q20-40, rotation, colour, text/logo overlay, flip, ...) of one
                     gallery photo; the gallery also holds distractor photos; some
                     queries are edited copies of photos NOT in the gallery (gt = []).
  semantic/          same-class retrieval on natural photos (GCompris: monument, animal,
                     hand_tool, energy, fish); queries are other photos of the class that
                     are not in the gallery, relevant = every gallery photo of that class.
  semantic_cutouts/  same-class retrieval on Tux Paint photo cut-outs on white
                     (mammal, bird, coin, flower); small images (~100-400 px).
  Classes with fewer than --min-class photos are left out.

gt.json maps query id -> list of relevant gallery ids (ids are opaque: g00001, q00001).
gallery.json / queries.json carry provenance (package, source path, licence, credit) and,
for queries, the edit and its parameters.

Development half only. Each photo has the identity "<package>:<source>"; photos of the same
landmark, tiles of one telescope mosaic, a stamp and its mirrored copy, and byte-identical files
form one unit. A unit belongs to the development half when sha256(unit key)[0] % 2 == 0
(``DEV_BUCKET``); the other half is held out for a final check and is never written by this
script (there is deliberately no option to select it). Every photo is therefore either fully in
or fully out of every set. Tuning anything in tusou on these sets is tuning on the dev half.

Same inputs + same seed + same Pillow version => same files (every random choice is
drawn from a generator seeded by hash(seed, image key, edit name)).
"""
# The build is a port of a standalone script kept in its original %-format style.
# ruff: noqa: UP031


import argparse
import fnmatch
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import struct
import sys
import tarfile
import time
import zlib

import PIL
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

Image.MAX_IMAGE_PIXELS = 200_000_000
DEFAULT_EVAL_DIR = os.path.expanduser("~/.cache/tusou-eval")

#: The Debian 12 packages and the exact versions the sets are defined on (package=version).
PACKAGES = [
    "gcompris-qt-data=3.1-2",  # 44 MB  natural photos (Wikimedia Commons etc.) inside Qt .rcc files
    "tuxpaint-stamps-default=2022.06.04-1",  # 161 MB  ~800 categorised stamps, most are photo cut-outs
    "tuxpaint-data=1:0.9.28-sdl2-1",  # 8 MB  19 photo "templates"
    "stellarium-data=0.22.2-1",  # 246 MB  555 telescope photos of nebulae/galaxies
    "lomiri-wallpapers-16.04=20.04.0-2",  # 16 MB  wallpapers (photos)
    "lomiri-wallpapers-20.04=20.04.0-2",  # 11 MB  wallpapers
    "mate-backgrounds=1.26.0-1",  # 47 MB  wallpapers (nature photos)
    "palapeli-data=4:22.12.3-1",  # 2 MB  5 jigsaw photos
    "plasma-workspace-wallpapers=4:5.27.5-2",  # 94 MB  wallpapers (some photos)
]


def fetch_debs(deb_dir, log=print):
    """apt-get download of every package of PACKAGES missing from deb_dir (exact version first,
    the archive's candidate version with a warning otherwise). Needs apt with the bookworm archive."""
    import subprocess

    os.makedirs(deb_dir, exist_ok=True)
    have = os.listdir(deb_dir)
    missing = [pv for pv in PACKAGES if not any(f.startswith(pv.split("=")[0] + "_") for f in have)]
    if not missing:
        return
    log("apt-get download %s" % " ".join(missing))
    if subprocess.run(["apt-get", "download", *missing], cwd=deb_dir).returncode == 0:
        return
    for pv in missing:
        p = pv.split("=")[0]
        if any(f.startswith(p + "_") for f in os.listdir(deb_dir)):
            continue
        if subprocess.run(["apt-get", "download", pv], cwd=deb_dir).returncode != 0:
            log("WARNING: %s is not in the archive; taking the candidate version (sets will differ)" % pv)
            subprocess.run(["apt-get", "download", p], cwd=deb_dir, check=True)

# --------------------------------------------------------------------------------------
# Source definitions (curated by looking at every image)
# --------------------------------------------------------------------------------------
COPYRIGHT = r"^usr/share/doc/[^/]+/copyright$"
GC_RCC = [
    "categorization",
    "explore_monuments",
    "erase",
    "explore_world_animals",
    "explore_farm_animals",
    "explore_world_music",
    "details",
]
LOMIRI_PHOTOS = [  # the others in these packages are drawings / abstract art
    "Bridge_by_Sander_Klootwijk",
    "Dragonfly_by_Bolly",
    "Picture_0B_by_freespace",
    "Picture_1A_by_freespace",
    "Wine_by_Jakkub_Mede",
    "aitzgorri_by_Aitzol_Berasategi",
    "free_by_Peter_Nerlich",
    "friends_by_Aitzol_Berasategi",
    "life_by_Aitzol_Berasategi",
    "picosdeeuropa_by_Aitzol_Berasategi",
    "seeding_by_Clements_Engelhardt",
    "sunset_by_Aitzol_Berasategi",
    "Kleiber_by_Lukas_Baubkus",
]
PLASMA_PHOTOS = [
    "BytheWater",
    "ColdRipple",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "OneStandsOut",
    "Path",
    "summer_1am",
]
PKG_FILTERS = {
    "gcompris-qt-data": [r"^usr/share/gcompris-qt/rcc/({})\.rcc$".format("|".join(GC_RCC)), COPYRIGHT],
    "tuxpaint-stamps-default": [r"^usr/share/tuxpaint/stamps/.*\.png$", COPYRIGHT],
    "tuxpaint-data": [r"^usr/share/tuxpaint/templates/.*\.jpg$", COPYRIGHT],
    "stellarium-data": [r"^usr/share/stellarium/nebulae/default/.*\.(png|jpg|json)$", COPYRIGHT],
    "lomiri-wallpapers-16.04": [
        r"^usr/share/backgrounds/({})\.jpg$".format("|".join(LOMIRI_PHOTOS)),
        COPYRIGHT,
    ],
    "lomiri-wallpapers-20.04": [
        r"^usr/share/backgrounds/({})\.jpg$".format("|".join(LOMIRI_PHOTOS)),
        COPYRIGHT,
    ],
    "mate-backgrounds": [r"^usr/share/backgrounds/mate/nature/.*\.jpg$", COPYRIGHT],
    "palapeli-data": [r"^usr/share/palapeli/collection/.*\.jpg$", COPYRIGHT],
    "plasma-workspace-wallpapers": [
        r"^usr/share/wallpapers/({})/(contents/images/.*|metadata\.json)$".format("|".join(PLASMA_PHOTOS)),
        COPYRIGHT,
    ],
}
PKG_LICENSE = {  # package-level licence (Debian copyright "Files: *"); per-image info added where known
    "gcompris-qt-data": "GPL-3+ (package); images mostly Wikimedia Commons: PD / CC0 / CC-BY(-SA), "
    "see credit",
    "tuxpaint-stamps-default": "GPL-2",
    "tuxpaint-data": "GPL-2+",
    "stellarium-data": "GPL-2+ (package); nebula photos: free use with credit, "
    "see credit + copyright 4.7-4.25",
    "lomiri-wallpapers-16.04": "see credit (CC-BY / CC-BY-SA per file)",
    "lomiri-wallpapers-20.04": "see credit (CC-BY / CC-BY-SA per file)",
    "mate-backgrounds": "see credit (GPL-2+ per file)",
    "palapeli-data": "GPL-2+",
    "plasma-workspace-wallpapers": "see credit (per-wallpaper metadata.json)",
}
GC_BASE = "gcompris/src/activities"
# GCompris natural photos: (rcc, glob below GC_BASE/<rcc>/resource/, semantic label or None)
GC_GROUPS = [
    ("categorization", "images/fishes/*.webp", "fish"),
    ("categorization", "images/monuments/*.webp", "monument"),
    ("explore_monuments", "*/*.webp", "monument"),
    ("details", "image/Chenonceau_background.webp", "monument"),
    ("details", "image/EgeskovSlotSpejling_background.webp", "monument"),
    ("details", "image/EilanDonanCastle_background.webp", "monument"),
    ("details", "image/GizahPyramids_background.webp", "monument"),
    ("details", "image/Louvre_2007_02_24_c_background.webp", "monument"),
    ("details", "image/NDP_background.webp", "monument"),
    ("details", "image/Nagoya_background.webp", "monument"),
    ("details", "image/OperaSidney_background.webp", "monument"),
    ("details", "image/TajMahal_background.webp", "monument"),
    ("details", "image/TourEiffel_background.webp", "monument"),
    ("details", "image/TowerBridgeLondon_background.webp", "monument"),
    # Neuschwanstein_background.webp is left out: same photo as explore_monuments/germany/neuschwansteinCastle
    ("categorization", "images/renewable/*.webp", "energy"),
    ("details", "image/FanoeWindmill_background.webp", "energy"),
    ("categorization", "images/tools/*.webp", "hand_tool"),
    ("categorization", "images/others/*.webp", "household_object"),
    ("erase", "*.webp", "animal"),
    ("explore_world_animals", "animals/*.webp", "animal"),
    ("explore_farm_animals", "animals/*.webp", "animal"),
    ("explore_world_music", "music/*.webp", None),
]
TUX_STAMPS = "usr/share/tuxpaint/stamps"
TUX_CLASSES = {
    "mammal": "animals/mammals",
    "bird": "animals/birds",
    "flower": "plants/flowers",
    "coin": "symbols/money",
}
TUX_EXCLUDE_DIRS = {"cartoon", "toys", "plastic", "00_symbols"}
TUX_EXCLUDE_NAMES = {"echidna.png", "hedgehog.png"}  # silhouette / drawing
LOGOS = [
    "animals/birds/cartoon/tux.png",
    "symbols/recycle.png",
    "symbols/shapes/star.png",
    "symbols/shapes/pawprint.png",
    "symbols/faces/happy.png",
]
WORDS = [
    "SALE",
    "Hello world",
    "#travel",
    "@photo_2024",
    "Sample",
    "COPYRIGHT",
    "memories",
    "Follow me",
    "best day ever",
    "LOL",
    "Summer vibes",
    "news",
    "watermark",
    "DEMO",
    "Do not copy",
    "2023-08-14 17:42",
    "Happy Birthday",
    "WOW",
    "shared via app",
    "I love it",
]
EDITS = [
    "crop",
    "resize_down",
    "jpeg",
    "rot90",
    "rotate_small",
    "brightness_contrast",
    "grayscale",
    "color_shift",
    "text_overlay",
    "logo_overlay",
    "hflip",
    "blur",
    "pad_border",
    "combo",
    "crop_jpeg",
]


# --------------------------------------------------------------------------------------
# Unpacking: .deb (ar + data.tar.*) and Qt .rcc, in pure Python
# --------------------------------------------------------------------------------------
class _Slice(io.RawIOBase):
    def __init__(self, f, start, size):
        self.f, self.pos, self.end = f, start, start + size

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.end - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def extract_deb(deb, dest, patterns):
    rx = [re.compile(p) for p in patterns]
    n = 0
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError("not a .deb: " + deb)
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                raise ValueError("no data.tar in " + deb)
            name = hdr[:16].decode().strip().rstrip("/")
            size = int(hdr[48:58].decode().strip())
            start = f.tell()
            if name.startswith("data.tar"):
                comp = name.rsplit(".", 1)[-1]
                mode = {"xz": "r|xz", "gz": "r|gz", "bz2": "r|bz2", "tar": "r|"}.get(comp)
                if mode is None:
                    raise ValueError(f"unsupported compression {comp} in {deb} (extract with dpkg -x)")
                stream = io.BufferedReader(_Slice(f, start, size), 1 << 20)
                with tarfile.open(fileobj=stream, mode=mode) as tf:
                    for m in tf:
                        p = m.name[2:] if m.name.startswith("./") else m.name
                        if m.isfile() and any(r.search(p) for r in rx):
                            out = os.path.join(dest, p)
                            os.makedirs(os.path.dirname(out), exist_ok=True)
                            with tf.extractfile(m) as src, open(out, "wb") as o:
                                shutil.copyfileobj(src, o)
                            n += 1
                return n
            f.seek(start + size + (size & 1))


def extract_rcc(path, outdir):
    """Qt binary resource file (format v1-v3); zlib-compressed entries supported."""
    b = open(path, "rb").read()
    if b[:4] != b"qres":
        raise ValueError("not an rcc file: " + path)
    ver, tree, data, names = struct.unpack(">IIII", b[4:20])
    esize = 14 if ver == 1 else 22
    out = []

    def name(off):
        n = struct.unpack(">H", b[names + off : names + off + 2])[0]
        return b[names + off + 6 : names + off + 6 + 2 * n].decode("utf-16-be")

    def walk(idx, prefix):
        e = tree + idx * esize
        noff, flags = struct.unpack(">IH", b[e : e + 6])
        nm = name(noff) if idx else ""
        if flags & 2:
            count, first = struct.unpack(">II", b[e + 6 : e + 14])
            for c in range(first, first + count):
                walk(c, os.path.join(prefix, nm))
            return
        doff = struct.unpack(">I", b[e + 10 : e + 14])[0]
        size = struct.unpack(">I", b[data + doff : data + doff + 4])[0]
        blob = b[data + doff + 4 : data + doff + 4 + size]
        if flags & 1:
            blob = zlib.decompress(blob[4:])
        elif flags & 4:
            raise ValueError("zstd-compressed rcc entry not supported: " + nm)
        p = os.path.join(outdir, prefix, nm)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as o:
            o.write(blob)
        out.append(p)

    walk(0, "")
    return out


def find_deb(debs, pkg):
    cands = sorted(f for f in os.listdir(debs) if f.startswith(pkg + "_") and f.endswith(".deb"))
    if not cands:
        raise SystemExit(f"missing {pkg}_*.deb in {debs} -- run fetch_sources.sh first")
    return os.path.join(debs, cands[-1])


def prepare_sources(debs, cache, log):
    versions = {}
    for pkg, pats in PKG_FILTERS.items():
        deb = find_deb(debs, pkg)
        versions[pkg] = os.path.basename(deb).split("_")[1].replace("%3a", ":")
        dest = os.path.join(cache, pkg)
        stamp = os.path.join(dest, ".extracted")
        if os.path.exists(stamp) and open(stamp).read() == os.path.basename(deb):
            continue
        shutil.rmtree(dest, ignore_errors=True)
        t = time.time()
        n = extract_deb(deb, dest, pats)
        if pkg == "gcompris-qt-data":
            for r in GC_RCC:
                extract_rcc(
                    os.path.join(dest, f"usr/share/gcompris-qt/rcc/{r}.rcc"), os.path.join(dest, "rcc_x", r)
                )
        with open(stamp, "w") as s:
            s.write(os.path.basename(deb))
        log("  unpacked %-28s %4d files  %.1fs" % (pkg, n, time.time() - t))
    return versions


# --------------------------------------------------------------------------------------
# Licence / credit parsing
# --------------------------------------------------------------------------------------
def parse_dep5(path):
    paras, cur, key = [], {}, None
    for line in open(path, encoding="utf-8", errors="replace"):
        if not line.strip():
            if cur:
                paras.append(cur)
            cur, key = {}, None
            continue
        if line[0] in " \t" and key:
            cur[key] += "\n" + line.strip()
            continue
        if ":" in line:
            key, val = line.split(":", 1)
            cur[key] = val.strip()
    if cur:
        paras.append(cur)
    return [p for p in paras if "Files" in p]


def dep5_lookup(paras, relpath):
    base = os.path.basename(relpath)
    best = None
    for p in paras:
        pats = p["Files"].split()
        if any(os.path.basename(x) == base for x in pats):
            return "{}; {}".format(p.get("Copyright", "").split("\n")[0], p.get("License", "").split("\n")[0])
        if "*" in pats and best is None:
            best = "{}; {}".format(p.get("Copyright", "").split("\n")[0], p.get("License", "").split("\n")[0])
    return best or ""


def parse_gcompris_readme(path):
    """categorization/images/*/README: blocks of Copyright/Source/License/Files."""
    res, cur, in_files = {}, {}, False
    for line in open(path, encoding="utf-8", errors="replace"):
        s = line.strip()
        if not s:
            in_files = False
            continue
        m = re.match(r"^(Copyright|Source|License|Files):\s*(.*)$", s)
        if m:
            k, v = m.groups()
            if k == "Copyright":
                cur = {}
            cur[k] = v
            in_files = k == "Files"
            if in_files and v:
                res[v] = dict(cur)
        elif in_files:
            res[s] = dict(cur)
    return {
        f: "{}; {}; {}".format(d.get("Copyright", ""), d.get("License", ""), d.get("Source", ""))
        for f, d in res.items()
    }


# --------------------------------------------------------------------------------------
# Catalogue of source images
# --------------------------------------------------------------------------------------
def item(key, path, pkg, group, label=None, credit=""):
    return {
        "key": key,
        "path": path,
        "package": pkg,
        "group": group,
        "label": label,
        "license": PKG_LICENSE[pkg],
        "credit": credit,
    }


def catalogue(cache):
    scenes, nebulae, cutouts = [], [], []
    # GCompris natural photos
    gdir = os.path.join(cache, "gcompris-qt-data", "rcc_x")
    readmes = {}
    for rcc, pat, label in GC_GROUPS:
        base = os.path.join(gdir, rcc, GC_BASE, rcc, "resource")
        for p in sorted(_glob(base, pat)):
            rel = os.path.relpath(p, base)
            rd = os.path.join(os.path.dirname(p), "README")
            if rd not in readmes:
                readmes[rd] = parse_gcompris_readme(rd) if os.path.exists(rd) else {}
            scenes.append(
                item(
                    f"gcompris:{rcc}/{rel}",
                    p,
                    "gcompris-qt-data",
                    "scene",
                    label,
                    readmes[rd].get(os.path.basename(p), ""),
                )
            )
    # Tux Paint photo templates
    d = os.path.join(cache, "tuxpaint-data", "usr/share/tuxpaint/templates")
    for f in sorted(os.listdir(d)):
        scenes.append(item("tuxpaint-data:templates/" + f, os.path.join(d, f), "tuxpaint-data", "scene"))
    # wallpapers
    for pkg in ["lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04"]:
        d = os.path.join(cache, pkg, "usr/share/backgrounds")
        paras = parse_dep5(os.path.join(cache, pkg, "usr/share/doc", pkg, "copyright"))
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            scenes.append(item(f"{pkg}:{f}", os.path.join(d, f), pkg, "scene", credit=dep5_lookup(paras, f)))
    pkg = "mate-backgrounds"
    d = os.path.join(cache, pkg, "usr/share/backgrounds/mate/nature")
    paras = parse_dep5(os.path.join(cache, pkg, "usr/share/doc", pkg, "copyright"))
    for f in sorted(os.listdir(d)):
        scenes.append(
            item(f"{pkg}:nature/{f}", os.path.join(d, f), pkg, "scene", credit=dep5_lookup(paras, f))
        )
    pkg = "palapeli-data"
    d = os.path.join(cache, pkg, "usr/share/palapeli/collection")
    for f in sorted(os.listdir(d)):
        scenes.append(item(f"{pkg}:{f}", os.path.join(d, f), pkg, "scene"))
    pkg = "plasma-workspace-wallpapers"
    for name in PLASMA_PHOTOS:
        wd = os.path.join(cache, pkg, "usr/share/wallpapers", name)
        imgs = []
        for f in sorted(os.listdir(os.path.join(wd, "contents/images"))):
            m = re.match(r"^(\d+)x(\d+)\.", f)
            if m:
                w, h = int(m.group(1)), int(m.group(2))
                imgs.append((w < h, w * h, f))  # prefer landscape, then smallest
        f = sorted(imgs)[0][2]
        credit = ""
        try:
            md = json.load(open(os.path.join(wd, "metadata.json"), encoding="utf-8"))["KPlugin"]
            credit = "{}; {}".format(md.get("Authors", [{}])[0].get("Name", ""), md.get("License", ""))
        except Exception:
            pass
        scenes.append(
            item(f"{pkg}:{name}/{f}", os.path.join(wd, "contents/images", f), pkg, "scene", credit=credit)
        )
    # Stellarium nebulae (telescope photos)
    pkg = "stellarium-data"
    d = os.path.join(cache, pkg, "usr/share/stellarium/nebulae/default")
    credits = {}
    tj = os.path.join(d, "textures.json")
    if os.path.exists(tj):
        txt = open(tj, encoding="utf-8", errors="replace").read()
        for m in re.finditer(r'"imageCredits"\s*:\s*\{([^}]*)\}\s*,\s*"imageUrl"\s*:\s*"([^"]+)"', txt):
            s = re.search(r'"[sS]hort"\s*:\s*"([^"]*)"', m.group(1))
            u = re.search(r'"infoUrl"\s*:\s*"([^"]*)"', m.group(1))
            credits[m.group(2)] = "; ".join(x.group(1) for x in (s, u) if x)
    for f in sorted(os.listdir(d)):
        if f.endswith((".png", ".jpg")):
            nebulae.append(
                item(f"{pkg}:nebulae/{f}", os.path.join(d, f), pkg, "nebula", credit=credits.get(f, ""))
            )
    # Tux Paint stamps (photo cut-outs with alpha)
    pkg = "tuxpaint-stamps-default"
    root = os.path.join(cache, pkg, TUX_STAMPS)
    cls_of = {v: k for k, v in TUX_CLASSES.items()}
    for dp, dn, fn in os.walk(root):
        dn.sort()
        rel_dir = os.path.relpath(dp, root)
        parts = rel_dir.split(os.sep)
        if TUX_EXCLUDE_DIRS & set(parts):
            continue
        label = None
        for pref, c in cls_of.items():
            if rel_dir == pref or rel_dir.startswith(pref + os.sep):
                label = c
        for f in sorted(fn):
            if f.endswith(".png") and f not in TUX_EXCLUDE_NAMES:
                cutouts.append(item(f"{pkg}:{rel_dir}/{f}", os.path.join(dp, f), pkg, "cutout", label))
    return scenes, nebulae, cutouts


def _glob(base, pat):
    out = []
    for dp, _dn, fn in os.walk(base):
        for f in fn:
            p = os.path.join(dp, f)
            if fnmatch.fnmatch(os.path.relpath(p, base), pat):
                out.append(p)
    return out


# --------------------------------------------------------------------------------------
# Source subset
# --------------------------------------------------------------------------------------
# Every source photo has an identity "<package>:<source>" (the two fields written to
# gallery.json / queries.json). Photos that show the same thing form one unit (its key
# is split_key()), so that they are always used together:
#   * GCompris photos of the same landmark (different photos, named alike),
#   * tiles of one Stellarium mosaic (lmc_01..16, barnard_loop-1..4, ...),
#   * a Tux Paint stamp and its "_mirror" variant, and byte-identical files.
# A unit belongs to bucket sha256(unit key)[0] % 2; this builder writes DEV_BUCKET only
# (the development half); the other bucket is held out and never used here.
DEV_BUCKET = 0
GC = "gcompris-qt-data:"
LANDMARKS = {  # landmark -> GCompris sources (checked by eye; dedupe drops exact copies)
    "eiffel_tower": [
        "categorization/images/monuments/eiffelTower.webp",
        "explore_monuments/france/eiffelTower.webp",
        "details/image/TourEiffel_background.webp",
    ],
    "taj_mahal": [
        "categorization/images/monuments/tajMahal.webp",
        "explore_monuments/wonders/tajMahal.webp",
        "details/image/TajMahal_background.webp",
    ],
    "giza_pyramids": [
        "categorization/images/monuments/greatPyramid.webp",
        "explore_monuments/egypt/greatPyramidOfGiza.webp",
        "details/image/GizahPyramids_background.webp",
    ],
    "brandenburg_gate": [
        "categorization/images/monuments/brandenburgGate.webp",
        "explore_monuments/germany/brandenburgGate.webp",
    ],
    "christ_the_redeemer": [
        "categorization/images/monuments/christTheRedeemer.webp",
        "explore_monuments/wonders/christTheRedeemer.webp",
    ],
    "colosseum": [
        "categorization/images/monuments/colosseum.webp",
        "explore_monuments/wonders/colosseum.webp",
    ],
    "great_wall": [
        "categorization/images/monuments/greatWall.webp",
        "explore_monuments/wonders/greatWallofChina.webp",
    ],
    "qutub_minar": [
        "categorization/images/monuments/kutubMinar.webp",
        "explore_monuments/india/qutubMinar.webp",
    ],
    "mount_rushmore": [
        "categorization/images/monuments/mountRushmore.webp",
        "explore_monuments/usa/mountRushmore.webp",
    ],
    "statue_of_liberty": [
        "categorization/images/monuments/statueOfLiberty.webp",
        "explore_monuments/usa/statueofLiberty.webp",
    ],
    "sydney_opera_house": [
        "categorization/images/monuments/operaHouse.webp",
        "details/image/OperaSidney_background.webp",
    ],
    "louvre": [
        "categorization/images/monuments/leMusee.webp",
        "details/image/Louvre_2007_02_24_c_background.webp",
    ],
    "chenonceau": [
        "explore_monuments/france/chateaudeChenonceau.webp",
        "details/image/Chenonceau_background.webp",
    ],
    # categorization/.../victoriaMemorial.webp is the London statue, explore_monuments/india/
    # victoriaMemorial.webp the Kolkata building: different monuments, not grouped.
}
LANDMARK_OF = {GC + src: name for name, srcs in LANDMARKS.items() for src in srcs}
STELLARIUM_MOSAIC = re.compile(r"^nebulae/(barnard_loop-|ic2118-|lmc_|rho-a|sh2-1-|smc29-)\d+\.png$")


def identity(it):
    return "{}:{}".format(it["package"], it["key"].split(":", 1)[1])


def split_key(it):
    ident = identity(it)
    if ident in LANDMARK_OF:
        return "landmark:" + LANDMARK_OF[ident]
    src = ident.split(":", 1)[1]
    if it["package"] == "stellarium-data":
        m = STELLARIUM_MOSAIC.match(src)
        if m:
            return "stellarium-data:mosaic:" + m.group(1)
    if it["package"] == "tuxpaint-stamps-default":
        return re.sub(r"_mirror(\.png)$", r"\1", ident)
    return ident


def bucket_of(key):
    return hashlib.sha256(key.encode("utf-8")).digest()[0] % 2


def assign_buckets(groups):
    """sets it["split_key"] and it["bucket"] for every item of every list in groups;
    byte-identical files share the smallest split key among them"""
    items = [it for g in groups for it in g]
    for it in items:
        it["split_key"] = split_key(it)
    by_content = {}
    for it in items:
        with open(it["path"], "rb") as f:
            by_content.setdefault(hashlib.sha256(f.read()).hexdigest(), []).append(it)
    for same in by_content.values():
        k = min(it["split_key"] for it in same)
        for it in same:
            it["split_key"] = k
    for it in items:
        it["bucket"] = bucket_of(it["split_key"])


# --------------------------------------------------------------------------------------
# Image utilities
# --------------------------------------------------------------------------------------
def rng_for(seed, *parts):
    h = hashlib.sha256((f"{seed}|" + "|".join(map(str, parts))).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def load_rgb(path, max_side=None, bg=(255, 255, 255)):
    """RGB, transparent parts flattened onto bg, longest side <= max_side"""
    im = Image.open(path)
    if max_side and im.format == "JPEG":
        im.draft("RGB", (max_side, max_side))
    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, tuple(bg) + (255,))
        canvas.alpha_composite(im)
        im = canvas
    im = im.convert("RGB")
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.LANCZOS)
    return im


def colour_count(path):
    im = Image.open(path)
    if im.mode == "P":
        return len(im.getcolors(256) or [])
    im = im.convert("RGBA")
    a = im.getchannel("A").point(lambda v: 255 if v > 127 else 0)
    rgb = Image.new("RGB", im.size, (0, 0, 0))
    rgb.paste(im.convert("RGB"), mask=a)
    return len(rgb.getcolors(rgb.width * rgb.height) or [])


def thumb_vec(path):
    im = load_rgb(path, 256).convert("L").resize((16, 16), Image.BILINEAR)
    v = list(im.tobytes())
    m = sum(v) / len(v)
    v = [x - m for x in v]
    n = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / n for x in v]


def dedupe(items, log, thr=0.97):
    """drop exact / near-exact copies (16x16 grey thumbnails, cosine >= thr)"""
    vecs = [thumb_vec(it["path"]) for it in items]
    keep, dropped = [], []
    for i, it in enumerate(items):
        dup = next(
            (j for j in keep if sum(a * b for a, b in zip(vecs[i], vecs[j], strict=False)) >= thr), None
        )
        if dup is None:
            keep.append(i)
        else:
            dropped.append((it["key"], items[dup]["key"]))
    for a, b in dropped:
        log(f"  dedupe: dropped {a} (same as {b})")
    return [items[i] for i in keep]


_FONT_CACHE = {}


def font(size):
    size = max(8, int(size))
    if size not in _FONT_CACHE:
        try:
            _FONT_CACHE[size] = ImageFont.load_default(size=size)  # Pillow >= 10.1 (FreeType)
        except TypeError:
            _FONT_CACHE[size] = ImageFont.load_default()
    return _FONT_CACHE[size]


def logo_image(cache, r):
    choice = r.randrange(len(LOGOS) + 1)
    if choice < len(LOGOS):
        p = os.path.join(cache, "tuxpaint-stamps-default", TUX_STAMPS, LOGOS[choice])
        if os.path.exists(p):
            return os.path.basename(p), Image.open(p).convert("RGBA")
    # synthetic badge logo
    s = 256
    im = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    col = tuple(r.randint(0, 255) for _ in range(3)) + (255,)
    d.ellipse((4, 4, s - 4, s - 4), fill=col, outline=(255, 255, 255, 255), width=10)
    txt = r.choice(["PHOTO", "NEWS", "TV", "LOGO", "CAM"])
    f = font(70)
    bb = d.textbbox((0, 0), txt, font=f)
    d.text(
        ((s - (bb[2] - bb[0])) / 2 - bb[0], (s - (bb[3] - bb[1])) / 2 - bb[1]),
        txt,
        font=f,
        fill=(255, 255, 255, 255),
    )
    return "badge:" + txt, im


def draw_text(im, r, size_frac=(0.06, 0.14)):
    im = im.copy()
    W, H = im.size
    d = ImageDraw.Draw(im)
    lines = [r.choice(WORDS) for _ in range(r.choice([1, 1, 2]))]
    txt = "\n".join(lines)
    size = max(10, int(r.uniform(*size_frac) * H))
    f = font(size)
    bb = d.multiline_textbbox((0, 0), txt, font=f)
    while (bb[2] - bb[0]) > 0.95 * W and size > 10:
        size = int(size * 0.85)
        f = font(size)
        bb = d.multiline_textbbox((0, 0), txt, font=f)
    tw, th = bb[2] - bb[0], bb[3] - bb[1]
    x = r.randint(0, max(0, W - tw)) - bb[0]
    y = r.randint(0, max(0, H - th)) - bb[1]
    col = tuple(r.choice([r.randint(0, 60), r.randint(195, 255)]) for _ in range(3))
    stroke = tuple(255 - c for c in col)
    sw = max(1, size // 14)
    d.multiline_text((x, y), txt, font=f, fill=col, stroke_width=sw, stroke_fill=stroke)
    return im, {"text": txt, "font_px": size, "xy": [x, y], "color": list(col)}


def apply_edit(im, edit, r, cache):
    """returns (image, params, jpeg_quality)"""
    W, H = im.size
    q = 90
    if edit in ("crop", "crop_jpeg"):
        a = r.uniform(0.5, 0.8)
        ar = r.uniform(0.75, 1.333)
        w = min(W, int(round(math.sqrt(a * W * H * ar))))
        h = min(H, int(round(a * W * H / max(w, 1))))
        x0, y0 = r.randint(0, W - w), r.randint(0, H - h)
        out, p = (
            im.crop((x0, y0, x0 + w, y0 + h)),
            {"box": [x0, y0, x0 + w, y0 + h], "area_frac": round(w * h / (W * H), 3)},
        )
        if edit == "crop_jpeg":
            q = r.randint(25, 45)
            p["quality"] = q
        return out, p, q
    if edit == "resize_down":
        s = r.uniform(0.2, 0.5)
        s = max(s, 64.0 / min(W, H)) if min(W, H) * s < 64 else s
        nw, nh = max(1, int(W * s)), max(1, int(H * s))
        return im.resize((nw, nh), Image.BICUBIC), {"scale": round(s, 3), "size": [nw, nh]}, q
    if edit == "jpeg":
        q = r.randint(20, 40)
        return im, {"quality": q}, q
    if edit == "rot90":
        ang = r.choice([90, 180, 270])
        t = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}[
            ang
        ]
        return im.transpose(t), {"angle_ccw": ang}, q
    if edit == "rotate_small":
        ang = r.choice([-1, 1]) * r.uniform(3, 15)
        fill = r.choice([(0, 0, 0), (255, 255, 255), (128, 128, 128)])
        return (
            im.rotate(ang, resample=Image.BICUBIC, expand=True, fillcolor=fill),
            {"angle_ccw": round(ang, 2), "expand": True, "fill": list(fill)},
            q,
        )
    if edit == "brightness_contrast":
        b = r.choice([r.uniform(0.5, 0.8), r.uniform(1.25, 1.6)])
        c = r.choice([r.uniform(0.5, 0.8), r.uniform(1.25, 1.6)])
        out = ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(b)).enhance(c)
        return out, {"brightness": round(b, 3), "contrast": round(c, 3)}, q
    if edit == "grayscale":
        return ImageOps.grayscale(im), {}, q
    if edit == "color_shift":
        shift = r.randint(30, 150) * r.choice([-1, 1])
        sat = r.choice([r.uniform(0.2, 0.6), r.uniform(1.4, 2.0)])
        h, s, v = im.convert("HSV").split()
        h = h.point(lambda x: (x + int(shift * 256 / 360)) % 256)
        out = Image.merge("HSV", (h, s, v)).convert("RGB")
        out = ImageEnhance.Color(out).enhance(sat)
        return out, {"hue_shift_deg": shift, "saturation": round(sat, 3)}, q
    if edit == "text_overlay":
        out, p = draw_text(im, r)
        return out, p, q
    if edit == "logo_overlay":
        name, logo = logo_image(cache, r)
        lw = max(16, int(r.uniform(0.15, 0.35) * W))
        lh = max(1, int(logo.height * lw / logo.width))
        if lh > 0.6 * H:
            lh = int(0.6 * H)
            lw = max(1, int(logo.width * lh / logo.height))
        logo = logo.resize((lw, lh), Image.LANCZOS)
        op = r.uniform(0.6, 1.0)
        logo.putalpha(logo.getchannel("A").point(lambda v: int(v * op)))
        m = int(0.03 * min(W, H))
        corner = r.choice(["tl", "tr", "bl", "br", "random"])
        x = {"tl": m, "bl": m, "tr": W - lw - m, "br": W - lw - m}.get(corner, r.randint(0, max(0, W - lw)))
        y = {"tl": m, "tr": m, "bl": H - lh - m, "br": H - lh - m}.get(corner, r.randint(0, max(0, H - lh)))
        out = im.convert("RGBA")
        out.alpha_composite(logo, (max(0, x), max(0, y)))
        return out.convert("RGB"), {"logo": name, "box": [x, y, x + lw, y + lh], "opacity": round(op, 2)}, q
    if edit == "hflip":
        return ImageOps.mirror(im), {}, q
    if edit == "blur":
        rad = r.uniform(0.002, 0.006) * max(W, H) + 0.8
        return im.filter(ImageFilter.GaussianBlur(rad)), {"radius": round(rad, 2)}, q
    if edit == "pad_border":
        fr = [r.uniform(0.05, 0.3) for _ in range(4)]
        lft, t, rr, b = int(fr[0] * W), int(fr[1] * H), int(fr[2] * W), int(fr[3] * H)
        col = tuple(r.randint(0, 255) for _ in range(3))
        out = Image.new("RGB", (W + lft + rr, H + t + b), col)
        out.paste(im, (lft, t))
        return out, {"ltrb": [lft, t, rr, b], "color": list(col)}, q
    if edit == "combo":  # crop + downscale + brightness + small caption + strong JPEG
        p = {}
        a = r.uniform(0.6, 0.9)
        w, h = int(W * math.sqrt(a)), int(H * math.sqrt(a))
        x0, y0 = r.randint(0, W - w), r.randint(0, H - h)
        out = im.crop((x0, y0, x0 + w, y0 + h))
        p["crop_box"] = [x0, y0, x0 + w, y0 + h]
        s = r.uniform(0.35, 0.7)
        out = out.resize((max(48, int(w * s)), max(48, int(h * s))), Image.BICUBIC)
        p["scale"] = round(s, 3)
        bfac = r.uniform(0.75, 1.3)
        out = ImageEnhance.Brightness(out).enhance(bfac)
        p["brightness"] = round(bfac, 3)
        out, tp = draw_text(out, r, (0.05, 0.09))
        p["text"] = tp["text"]
        q = r.randint(25, 45)
        p["quality"] = q
        return out, p, q
    raise ValueError(edit)


def save_jpeg(im, path, q):
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    im.save(path, "JPEG", quality=q)
    return os.path.getsize(path)


# --------------------------------------------------------------------------------------
# Worker tasks (top level so that multiprocessing can pickle them)
# --------------------------------------------------------------------------------------
def task_gallery(args):
    src, dst, max_side, bg = args
    im = load_rgb(src, max_side, bg)
    return dst, im.size, save_jpeg(im, dst, 95)


def task_queries(args):
    """args: (base_path_or_None, src, max_side, seed, key, [(edit, dst)], cache)"""
    base, src, max_side, seed, key, jobs, cache = args
    im = load_rgb(base) if base else load_rgb(src, max_side)
    out = []
    for edit, dst in jobs:
        r = rng_for(seed, key, edit)
        e, params, q = apply_edit(im, edit, r, cache)
        out.append((dst, e.size, params, save_jpeg(e, dst, q)))
    return out


def run_pool(fn, tasks, jobs):
    if jobs <= 1:
        return [fn(t) for t in tasks]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(fn, tasks, chunksize=4)


def public(it, **extra):
    d = {k: it[k] for k in ("package", "license", "credit")}
    d["source"] = it["key"].split(":", 1)[1]
    d.update(extra)
    return d


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, sort_keys=True)


# --------------------------------------------------------------------------------------
# Set builders
# --------------------------------------------------------------------------------------
def build_neardup(a, scenes, nebulae, cutouts, log):
    out = os.path.join(a.out, "neardup")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "gallery"))
    os.makedirs(os.path.join(out, "queries"))
    r = rng_for(a.seed, "neardup-split")
    pool = sorted(scenes, key=lambda it: it["key"])
    r.shuffle(pool)
    if len(pool) < a.n_originals + a.n_negatives:
        raise SystemExit(
            "only %d scene photos for %d originals + %d negatives" % (len(pool), a.n_originals, a.n_negatives)
        )
    originals = pool[: a.n_originals]
    negatives = pool[a.n_originals : a.n_originals + a.n_negatives]
    distractors = pool[a.n_originals + a.n_negatives :] + list(nebulae)
    # photo-like Tux Paint cut-outs (many colours, not tiny) as extra distractors
    distractors += [
        c for c in cutouts if max(Image.open(c["path"]).size) >= 128 and colour_count(c["path"]) >= 3000
    ]
    gal = [(it, "original") for it in originals] + [(it, "distractor") for it in distractors]
    r.shuffle(gal)
    gid = {}
    gallery_meta, tasks = [], []
    for i, (it, role) in enumerate(gal, 1):
        g = "g%05d" % i
        gid[it["key"]] = g
        dst = os.path.join(out, "gallery", g + ".jpg")
        bg = (0, 0, 0) if it["group"] == "nebula" else (255, 255, 255)  # nebula PNGs fade to black
        tasks.append((it["path"], dst, a.max_side, bg))
        gallery_meta.append(public(it, id=g, file=f"gallery/{g}.jpg", role=role, group=it["group"]))
    t = time.time()
    res = run_pool(task_gallery, tasks, a.jobs)
    for m, (_dst, size, _nbytes) in zip(gallery_meta, res, strict=False):
        m["width"], m["height"] = size
    log(
        "  neardup gallery: %d images (%d originals, %d distractors) %.1fs"
        % (len(gal), len(originals), len(distractors), time.time() - t)
    )
    # queries
    qlist = []
    for it in originals:
        for e in EDITS:
            qlist.append((it, e, True))
    for it in negatives:
        rr = rng_for(a.seed, "neg-edits", it["key"])
        for e in sorted(rr.sample(EDITS, a.neg_edits), key=EDITS.index):
            qlist.append((it, e, False))
    r.shuffle(qlist)
    qid = {}
    for i, (it, e, _) in enumerate(qlist, 1):
        qid[(it["key"], e)] = "q%05d" % i
    by_src = {}
    for it, e, in_gal in qlist:
        by_src.setdefault(it["key"], (it, in_gal, []))[2].append(e)
    tasks = []
    for key in sorted(by_src):
        it, in_gal, edits = by_src[key]
        base = os.path.join(out, "gallery", gid[key] + ".jpg") if in_gal else None
        jobs = [
            (e, os.path.join(out, "queries", qid[(key, e)] + ".jpg")) for e in sorted(edits, key=EDITS.index)
        ]
        tasks.append((base, it["path"], a.max_side, a.seed, key, jobs, a.cache))
    t = time.time()
    res = run_pool(task_queries, tasks, a.jobs)
    qmeta, gt = [], {}
    for task, rows in zip(tasks, res, strict=False):
        key = task[4]
        it, in_gal, _ = by_src[key]
        for (e, _dst), (_dst2, size, params, _nbytes) in zip(task[5], rows, strict=False):
            q = qid[(key, e)]
            rel = [gid[key]] if in_gal else []
            gt[q] = rel
            qmeta.append(
                public(
                    it,
                    id=q,
                    file=f"queries/{q}.jpg",
                    edit=e,
                    params=params,
                    width=size[0],
                    height=size[1],
                    relevant=rel,
                    in_gallery=in_gal,
                )
            )
    qmeta.sort(key=lambda m: m["id"])
    log(
        "  neardup queries: %d (%d with a match, %d without) %.1fs"
        % (
            len(qmeta),
            sum(1 for v in gt.values() if v),
            sum(1 for v in gt.values() if not v),
            time.time() - t,
        )
    )
    write_json(os.path.join(out, "gallery.json"), gallery_meta)
    write_json(os.path.join(out, "queries.json"), qmeta)
    write_json(os.path.join(out, "gt.json"), gt)
    return {
        "gallery": len(gallery_meta),
        "gallery_originals": len(originals),
        "gallery_distractors": len(distractors),
        "queries": len(qmeta),
        "queries_with_match": sum(1 for v in gt.values() if v),
        "queries_without_match": sum(1 for v in gt.values() if not v),
        "edits": EDITS,
    }


def build_semantic(a, items, name, log, min_class):
    out = os.path.join(a.out, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "gallery"))
    os.makedirs(os.path.join(out, "queries"))
    by = {}
    for it in sorted(items, key=lambda it: it["key"]):
        if it["label"]:
            by.setdefault(it["label"], []).append(it)
    classes = {c: v for c, v in sorted(by.items()) if len(v) >= min_class}
    for c in sorted(set(by) - set(classes)):
        log("  %s: class %s skipped (%d < %d images)" % (name, c, len(by[c]), min_class))
    gal, qs = [], []
    for c, v in classes.items():
        v = list(v)
        rng_for(a.seed, name, c).shuffle(v)
        nq = max(a.min_queries, int(round(a.query_frac * len(v))))
        qs += v[:nq]
        gal += v[nq:]
    r = rng_for(a.seed, name, "ids")
    r.shuffle(gal)
    r.shuffle(qs)
    tasks, gmeta, qmeta = [], [], []
    for i, it in enumerate(gal, 1):
        g = "g%05d" % i
        tasks.append((it["path"], os.path.join(out, "gallery", g + ".jpg"), a.max_side, (255, 255, 255)))
        gmeta.append(public(it, id=g, file=f"gallery/{g}.jpg", label=it["label"]))
    for i, it in enumerate(qs, 1):
        q = "q%05d" % i
        tasks.append((it["path"], os.path.join(out, "queries", q + ".jpg"), a.max_side, (255, 255, 255)))
        qmeta.append(public(it, id=q, file=f"queries/{q}.jpg", label=it["label"]))
    t = time.time()
    res = run_pool(task_gallery, tasks, a.jobs)
    for m, (_dst, size, _nbytes) in zip(gmeta + qmeta, res, strict=False):
        m["width"], m["height"] = size
    gt = {m["id"]: sorted(g["id"] for g in gmeta if g["label"] == m["label"]) for m in qmeta}
    write_json(os.path.join(out, "gallery.json"), gmeta)
    write_json(os.path.join(out, "queries.json"), qmeta)
    write_json(os.path.join(out, "gt.json"), gt)
    # extra protocol without extra files: every gallery image as a query against the rest
    write_json(
        os.path.join(out, "gt_loo.json"),
        {
            m["id"]: sorted(g["id"] for g in gmeta if g["label"] == m["label"] and g["id"] != m["id"])
            for m in gmeta
        },
    )
    counts = {
        c: {
            "gallery": sum(1 for g in gmeta if g["label"] == c),
            "queries": sum(1 for q in qmeta if q["label"] == c),
        }
        for c in classes
    }
    log(
        "  %s: %d gallery + %d queries, classes %s  %.1fs"
        % (
            name,
            len(gmeta),
            len(qmeta),
            {c: v["gallery"] + v["queries"] for c, v in counts.items()},
            time.time() - t,
        )
    )
    return {"gallery": len(gmeta), "queries": len(qmeta), "classes": counts}


def dir_stats(path):
    n = size = 0
    for dp, _dn, fn in os.walk(path):
        for f in fn:
            n += 1
            size += os.path.getsize(os.path.join(dp, f))
    return n, size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-dir", default=DEFAULT_EVAL_DIR, help="holds deb/, cache/ and out/")
    ap.add_argument("--no-fetch", action="store_true", help="do not run apt-get; deb/ must be complete")
    ap.add_argument("--seed", default="1234")
    ap.add_argument("--max-side", type=int, default=1024, help="longest side of gallery images")
    ap.add_argument(
        "--n-originals",
        type=int,
        default=80,
        help="neardup: gallery photos that get edited copies as queries",
    )
    ap.add_argument(
        "--n-negatives",
        type=int,
        default=20,
        help="neardup: photos kept OUT of the gallery whose edits are queries without a match",
    )
    ap.add_argument(
        "--neg-edits", type=int, default=5, help="neardup: edits per photo kept out of the gallery"
    )
    ap.add_argument(
        "--query-frac", type=float, default=0.2, help="semantic: share of each class used as queries"
    )
    ap.add_argument("--min-queries", type=int, default=4, help="semantic: fewest queries per class")
    ap.add_argument("--min-class", type=int, default=12, help="semantic: smallest class kept")
    ap.add_argument("--sets", default="neardup,semantic,semantic_cutouts")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    a.debs = os.path.join(a.eval_dir, "deb")
    a.cache = os.path.join(a.eval_dir, "cache")
    a.out = os.path.join(a.eval_dir, "out")
    t0 = time.time()

    def log(s):
        print(f"[{time.time() - t0:6.1f}s] {s}", flush=True)

    log(f"Pillow {PIL.__version__}, seed {a.seed}")
    if not a.no_fetch:
        fetch_debs(a.debs, log)
    versions = prepare_sources(a.debs, a.cache, log)
    scenes, nebulae, cutouts = catalogue(a.cache)
    log(
        "catalogue: %d scene photos, %d nebula photos, %d Tux Paint stamps"
        % (len(scenes), len(nebulae), len(cutouts))
    )
    scenes = dedupe(scenes, log)  # over all photos, so that no copy of a used photo is left elsewhere
    log("after dedupe: %d scene photos" % len(scenes))
    assign_buckets([scenes, nebulae, cutouts])
    scenes, nebulae, cutouts = (
        [it for it in g if it["bucket"] == DEV_BUCKET] for g in (scenes, nebulae, cutouts)
    )
    log(
        "source bucket %d: %d scene photos, %d nebula photos, %d Tux Paint stamps"
        % (DEV_BUCKET, len(scenes), len(nebulae), len(cutouts))
    )
    os.makedirs(a.out, exist_ok=True)
    summary = {
        "seed": a.seed,
        "pillow": PIL.__version__,
        "python": sys.version.split()[0],
        "max_side": a.max_side,
        "packages": versions,
        "sets": {},
        "source_bucket": DEV_BUCKET,
        "source_rule": "sha256(unit key)[0] %% 2 == %d" % DEV_BUCKET,
        "options": {
            k: v
            for k, v in sorted(vars(a).items())
            if k not in ("debs", "cache", "out", "jobs", "eval_dir", "no_fetch")
        },
    }
    sets = a.sets.split(",")
    if "neardup" in sets:
        summary["sets"]["neardup"] = build_neardup(a, scenes, nebulae, cutouts, log)
    if "semantic" in sets:
        summary["sets"]["semantic"] = build_semantic(a, scenes, "semantic", log, a.min_class)
    if "semantic_cutouts" in sets:
        cut = [c for c in cutouts if c["label"] and min(Image.open(c["path"]).size) >= 48]
        summary["sets"]["semantic_cutouts"] = build_semantic(a, cut, "semantic_cutouts", log, a.min_class)
    lic = os.path.join(a.out, "licenses")
    os.makedirs(lic, exist_ok=True)
    for pkg in PKG_FILTERS:
        p = os.path.join(a.cache, pkg, "usr/share/doc", pkg, "copyright")
        if os.path.exists(p):
            shutil.copy(p, os.path.join(lic, pkg + ".copyright"))
    for s in summary["sets"]:
        n, size = dir_stats(os.path.join(a.out, s))
        summary["sets"][s]["files"] = n
        summary["sets"][s]["bytes"] = size
    write_json(os.path.join(a.out, "manifest.json"), summary)
    for s, v in summary["sets"].items():
        log(
            "%-17s gallery %5d  queries %5d  files %5d  %.1f MB"
            % (s, v["gallery"], v["queries"], v["files"], v["bytes"] / 1e6)
        )
    log("done")


if __name__ == "__main__":
    main()
