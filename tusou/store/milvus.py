"""The distributed store: Milvus keeps vectors and metadata; several stateless tusou processes share it.

Layout (two collections, names from ``settings.milvus_collection``):

* ``<name>`` holds one row per image: ``seq`` (INT64 primary key, the listing order), ``gkey`` (hash of
  tenant and group, the partition key), ``ikey`` (hash of the image id), the original ``tenant``, ``grp``
  and ``image_id``, ``label``, ``desc`` (JSON text), ``uri`` and ``vec`` (FLAT index, inner product:
  vectors are unit rows, so IP is cosine).
* ``<name>_groups`` is the group registry: one row per (tenant, group), so empty groups exist and
  ``list_groups`` is exact. Milvus 2.3 requires a vector field in every collection; it gets a 2-d dummy.

Choices, and why:

* **Hashed keys in filters.** Every filter expression is built only from hex digests and integers, never
  from tenant, group or image text, so no quoting rules of Milvus's expression parser can be tripped
  (or injected into). The originals are stored alongside and compared in Python after each lookup, so a
  hash collision can never mix two images up.
* **Groups through a partition key, not one partition per group.** Milvus caps partitions per collection
  and creating one is a slow DDL call; a partition key hashes ``gkey`` into a fixed set of physical
  partitions, a filter ``gkey in [..]`` prunes a search to those, and groups cost nothing to create.
* **pk = seq, from Milvus's timestamp oracle.** Milvus hands out unique, increasing hybrid timestamps to
  every client (milliseconds and an 18-bit logical counter). A batch of up to 1024 rows takes one:
  seq = ms since 2024 (41 bits) | logical (10 bits; a timestamp with a larger logical part is skipped) |
  row in the batch (10 bits) | version (2 bits, see *Updates*). So sequence numbers are unique across all
  processes on one Milvus, with no tag to clash and no counter to keep, and increase in the order the
  batches were written, whichever process wrote them. (Where the server has no timestamp oracle, the test
  double, a local microsecond clock stands in.) Listing pages
  are ``seq > marker`` ordered by seq: the server answers ``query(limit=)`` with the smallest primary keys.
  (Milvus Lite does not; it is only a test double, tests/milvus_lite.py, and this class refuses a file uri.)
* **Repeated ids.** Milvus does not enforce uniqueness of anything but cannot even do that for the pk.
  A write checks for existing ids, inserts, then checks again: a writer that sees *another* row with one
  of its ids deletes its own row and reports "id already exists". Of two racing writers the one checking
  last always sees the other, so a duplicate never survives (at worst both lose). The same rule settles
  two processes creating one group at once.
* **Read-your-writes.** Reads use ``consistency`` (default ``Session``): pymilvus passes the timestamp of
  this process's last write to the collection as the read's guarantee timestamp, so a write this process
  acknowledged is visible to its next read, and a read with no write of its own pending waits for nothing.
  Writes of other processes become visible as soon as the query node has consumed them (about one
  ``proxy.timeTickInterval``; docs/scale.md gives the measured bound). Strong only where a request needs
  to see other processes' writes: the checks that settle races between writers (a group created twice,
  an id added twice), and a group that a non-Strong read did not find is looked up again with Strong
  before "not exists" is answered. ``Strong`` makes every read wait for every process's writes (up to
  about two time ticks). Reads that an operation needs together (group check and data) run in parallel.
  A search folds its existence checks into itself: rows found of a group show that the group exists, and
  only a group it found nothing of is looked up afterwards (tests/test_milvus_rounds.py records the reads).
* **Updates cannot lose an image.** Milvus rewrites a row to change it, and Milvus 2.3's upsert lost rows on
  a partition-key collection. An update therefore inserts the new version first, under the next version
  of the primary key (low 2 bits + 1 mod 4: the same listing position), and only then deletes the versions
  it read. A crash between the two calls leaves both versions, never none; reads keep the newer one
  (the version one past the other) and the next update removes the stale one. Two processes updating one
  image at once are settled after the write (``MilvusStore._rewrite_rows``): one row stays.
* **Durability.** A write is acknowledged once Milvus has accepted it into its log (rocksmq in standalone,
  Pulsar/Kafka in a cluster), from which it replays after a crash; tusou never calls ``flush`` per request
  (that seals tiny segments and is rate-limited). Milvus persists segments on its own schedule.
* **Results not cut short.** A search returns every row an exact scan finds at or above ``min_cosine`` (up
  to ``limit``), within the index's measured recall; a limit above Milvus's top-k cap (16384) or ``-1``
  walks down in bands of cosine. The index is FLAT (exact, a range search per band) by default, chosen
  when the collection is created. ``IVF_FLAT``/``IVF_SQ8`` (128 lists per segment, ``nprobe`` searched)
  take their first band as a top-k search with ids only, then read the matching rows' fields by key (see
  ``_ivf_band``: Milvus 2.3.5's IVF range search ignores nprobe). ``HNSW`` (M 16, efConstruction 200)
  keeps the range search, with ``ef`` at least the band's size (at most 32768). tests/test_milvus_ann.py
  and bench/scale.py --store milvus measure recall against an exact scan.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tusou.store.base import (
    KEEP,
    GroupExists,
    GroupNotFound,
    Hit,
    Hits,
    ImageInfo,
    ImageNotFound,
    ItemError,
    ModelMismatch,
    NewImage,
    Store,
    StoreError,
)
from tusou.store.filters import Filter
from tusou.store.markers import MarkerCodec, new_marker_key

# Milvus's top-k and query-window cap (maxTopK / maxQueryResultWindow in 2.3).
TOPK_CAP = 16_384
# Vector indexes a collection may be created with, and their build parameters (docs/scale.md).
INDEXES: dict[str, dict[str, int]] = {
    "FLAT": {},
    "HNSW": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {"nlist": 128},
    "IVF_SQ8": {"nlist": 128},
}
# Inverted-file lists per segment of a new IVF collection, and lists searched per segment: docs/scale.md
# gives the recall and speed measured with them (1024 lists for segments of ~1M rows).
DEFAULT_NLIST = 128
DEFAULT_NPROBE = 8
# A search for every match (a top-k band above _INLINE_FIELDS rows) searches this many times nprobe lists
# (at most all of them): its matches spread over more lists than one best row does (docs/scale.md).
_WIDE_NPROBE = 8
_HNSW_MIN_EF = 256
_HNSW_MAX_EF = 32_768
# Bytes of vectors per insert call: well below gRPC message limits (2000 rows at dim 1280, 10000 at 256).
_INSERT_BYTES = 10 << 20
# Keys per ``in [...]`` filter.
_IN_CHUNK = 1000
# Writes of an updated row when racing updates of the same image collide (see MilvusStore._rewrite).
_REWRITE_TRIES = 6
# An IVF top-k search up to this many rows returns their fields at once; a larger one, ids first.
_INLINE_FIELDS = 100
# Rows of an IVF top-k search for a larger limit or -1, before asking for the whole band (16384).
_IVF_FIRST_K = 2048
# Range search excludes its radius; ask for a little more and apply min_cosine exactly here.
_RADIUS_SLACK = 1e-4
_EPOCH_US = 1_704_067_200_000_000  # 2024-01-01, so the microsecond count fits in 51 bits for 70 years
_REGISTRY_DIM = 2
_META_SEQ = 0  # real sequence numbers are far above 0

# Per process, per (server uri, collection): a server timestamp taken after this process's last write (-1:
# the server gives none, read with Strong). A Session read waits for it (see MilvusStore._wrote).
_WRITTEN: dict[tuple[str, str], int] = {}
_WRITTEN_LOCK = threading.Lock()
# Within MilvusStore.read_snapshot(): (the store, the guarantee timestamp its reads carry) for this request.
_PINNED: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("tusou_pinned", default=None)
# Within MilvusStore.read_snapshot(): (id of the store, tenant, group) -> the group's registry seq, for the
# groups this request has found already (a search by a stored id checks its group once, not per read).
_CHECKED: contextvars.ContextVar[dict[tuple[int, str, str], int] | None] = contextvars.ContextVar(
    "tusou_checked", default=None
)

# Byte limits of the VARCHAR fields; the service's own limits are lower in characters, these are in bytes.
_MAX = {
    "tenant": 1024,
    "grp": 1024,
    "image_id": 1024,
    "label": 4096,
    "desc": 16384,
    "uri": 65535,
    "tags": 4096,
    "lkey": 32,
}

_IMAGE_FIELDS = ["seq", "tenant", "grp", "image_id", "label", "desc", "uri"]
# Scalar indexes of a new images collection (MilvusStore._ensure_indexes). Without one Milvus evaluates a
# filter on the field row by row: ``gkey`` (every search and read names its group, and the partition key
# only picks the partition, shared by every group hashed to it) cost 3-7 ms of a 200k-row search, and an
# image looked up by id (``ikey``; a search by a stored id starts with one) scanned every key.
_SCALAR_INDEXED = ("gkey", "ikey")
# Seconds a process trusts its count of the collection's groups (MilvusStore._alone).
_GROUPS_TTL_S = 5.0


def _key(*parts: str) -> str:
    """A filter-safe 128-bit key: NUL separates parts, which no tenant, group or id may contain."""
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest()


def _in(field: str, values: Sequence[str] | Sequence[int]) -> str:
    """``field in [...]`` over hex keys or integers only (never user text, so no quoting needed)."""
    items = ",".join(f'"{v}"' if isinstance(v, str) else str(int(v)) for v in values)
    return f"{field} in [{items}]"


def _dump_desc(desc: object) -> str:
    return "" if desc is None else json.dumps(desc, ensure_ascii=False, separators=(",", ":"))


def _load_desc(text: str) -> object:
    return "" if not text else json.loads(text)


def _dump_tags(tags: list[list[float]] | None) -> str:
    return "" if tags is None else json.dumps(tags, separators=(",", ":"))


def _load_tags(row: dict) -> list[list[float]] | None:
    text = row.get("tags")
    return json.loads(text) if text else None


# --- filters as Milvus expressions ----------------------------------------------------------------------
# Filter values are user text, so (as with group and image ids) they never enter an expression: the label
# is stored hashed in ``lkey`` and the desc's top-level scalars in the JSON column ``meta`` under hashed
# keys, strings hashed too, numbers and booleans as they are. A filter becomes an expression over those
# hashes and numbers only; Milvus's answer is a superset (its JSON comparisons let true equal 1), and
# Filter.matches on the real label and desc makes it exact.


def _meta(desc: object) -> dict[str, object]:
    """The ``meta`` column of a desc: hashed top-level keys -> hashed strings, numbers and booleans."""
    out: dict[str, object] = {}
    if isinstance(desc, dict):
        for k, v in desc.items():
            if isinstance(v, str):
                out[_key("k", k)] = _key("v", v)
            elif isinstance(v, bool) or (isinstance(v, int | float) and math.isfinite(v)):
                out[_key("k", k)] = v
    return out


def _number(v: float) -> str:
    """A number as an expression literal: plain decimal digits, no exponent."""
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return np.format_float_positional(float(v), trim="-")


def _value(v: object) -> str | None:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{_key("v", v)}"'
    if isinstance(v, int | float):
        return _number(v)
    return None  # null: not indexed, no pre-filter for it


def _expr(where: Filter) -> str:
    """A Milvus expression selecting a superset of the rows ``where`` matches ("" = no pre-filter)."""
    parts: list[str] = []
    for c in where.conditions:
        if not c.on_desc:
            values = [c.value] if c.op == "eq" else list(c.value)
            keys = [_key("label", v) for v in values if isinstance(v, str)]
            parts.append(_in("lkey", keys) if keys else "seq < 0")
            continue
        field = f'meta["{_key("k", c.field)}"]'
        if c.op in ("eq", "in"):
            literals = [_value(v) for v in ([c.value] if c.op == "eq" else list(c.value))]
            if any(lit is None for lit in literals):
                continue
            parts.append("(" + " or ".join(f"{field} == {lit}" for lit in literals) + ")")
        else:
            op = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[c.op]
            parts.append(f"{field} {op} {_number(float(c.value))}")
    return " and ".join(parts)


_VERSION_BITS = 2
_VERSIONS = 1 << _VERSION_BITS
_BLOCK = 1024  # rows per timestamp
_LOGICAL_BITS = 18  # of Milvus's hybrid timestamps
_EPOCH_MS = _EPOCH_US // 1000


def _next_version(seq: int) -> int:
    """The primary key of a row's next version: same listing position, low bits + 1 mod 4."""
    return (seq & ~(_VERSIONS - 1)) | ((seq + 1) & (_VERSIONS - 1))


def _newest(rows: list[dict]) -> list[dict]:
    """One row per image id: where an interrupted update left two versions, the newer one (whose version
    is one past the other's). Keeps the order of ``rows``."""
    by_id: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        key = (r.get("tenant", ""), r.get("grp", ""), r["image_id"])
        other = by_id.get(key)
        if other is None or _next_version(other["seq"]) == r["seq"]:
            by_id[key] = r
    kept = {id(r) for r in by_id.values()}
    return [r for r in rows if id(r) in kept]


class SeqSource:
    """Unique, increasing 63-bit sequence numbers (see the module docstring): one timestamp from the
    server's oracle per block of 1024 rows; a local microsecond clock where the server has none."""

    def __init__(self, alloc: Callable[[], int] | None = None) -> None:
        self._alloc = alloc
        self._tag = int.from_bytes(os.urandom(2), "big") & 0x3FF
        self._last_us = 0
        self._lock = threading.Lock()

    def _block(self) -> int | None:
        """The base of a block of 1024 sequence numbers, from one oracle timestamp (None: no oracle)."""
        while self._alloc is not None:
            try:
                ts = int(self._alloc())
            except Exception:  # noqa: BLE001 (no oracle: the local clock below)
                ts = 0
            if ts <= 0:
                self._alloc = None
                break
            physical, logical = ts >> _LOGICAL_BITS, ts & ((1 << _LOGICAL_BITS) - 1)
            if logical < 1 << 10:
                return ((physical - _EPOCH_MS) << 22) | (logical << 12)
        return None

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            k = min(n - len(out), _BLOCK)
            base = self._block()
            if base is None:
                with self._lock:
                    now = time.time_ns() // 1000 - _EPOCH_US
                    first = max(now, self._last_us + 1)
                    self._last_us = first + k - 1
                out += [((first + i) << 12) | (self._tag << _VERSION_BITS) for i in range(k)]
            else:
                out += [base | (i << _VERSION_BITS) for i in range(k)]
        return out


class MilvusStore(Store):
    def __init__(
        self,
        uri: str,
        *,
        collection: str,
        model_id: str,
        dim: int,
        group_max_images: int = 500_000,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        consistency: str = "Session",
        num_partitions: int = 64,
        index: str = "FLAT",
        nprobe: int = DEFAULT_NPROBE,
        nlist: int = DEFAULT_NLIST,
    ) -> None:
        from pymilvus import MilvusClient  # lazy: the embedded default does not need pymilvus

        self.uri = uri
        self.dim = dim
        self.group_max_images = group_max_images
        self.consistency = consistency
        if index not in INDEXES:
            raise ValueError(f"milvus index must be one of {', '.join(INDEXES)}, not {index!r}")
        self.index_type = index
        self.nprobe = nprobe
        self.nlist = nlist
        self.images = collection
        self.groups = f"{collection}_groups"
        self._check_uri(uri)
        kwargs: dict[str, Any] = {"uri": uri}
        if token:
            kwargs["token"] = token
        elif user:
            kwargs["user"], kwargs["password"] = user, password or ""
        self.client = MilvusClient(**kwargs)
        self._seqs = SeqSource(self._alloc_timestamp)
        # Serialises this process's writes so its own checks (duplicates, group size) are exact.
        self._write_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="milvus")
        self._schemas: dict[str, dict] = {}  # collection -> its description, for column inserts
        self._groups_seen = (-1, 0.0)  # (groups in the registry, monotonic time read): see _alone
        self._groups_counting = threading.Lock()
        self._setup(model_id, num_partitions)

    SERVER_SCHEMES = ("http://", "https://", "tcp://", "unix:", "grpc://")

    @classmethod
    def _check_uri(cls, uri: str) -> None:
        # Milvus Lite (a local file) behaves differently (query order, range search): it is only a test
        # double (tests/milvus_lite.py), never something to serve from.
        if not uri.startswith(cls.SERVER_SCHEMES):
            raise ValueError(f"milvus_uri must be a Milvus server address ({', '.join(cls.SERVER_SCHEMES)})")

    def _index_params(self) -> dict[str, int]:
        params = dict(INDEXES[self.index_type])
        if "nlist" in params:
            params["nlist"] = self.nlist
        return params

    # --- schema --------------------------------------------------------------------------------------
    def _setup(self, model_id: str, num_partitions: int, attempts: int = 10) -> None:
        """Create or open the collections. Several tusou processes may start at once on a new collection:
        while one creates, indexes and loads it, another's calls fail ("collection not loaded", "already
        exists"); each of those steps is idempotent, so a loser waits a moment and runs them again."""
        from pymilvus import MilvusException

        for attempt in range(attempts):
            try:
                self._ensure_collections(model_id, num_partitions)
                return
            except MilvusException:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5 + random.random())

    def _ensure_collections(self, model_id: str, num_partitions: int) -> None:
        from pymilvus import DataType, MilvusClient

        if not self.client.has_collection(self.groups):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("seq", DataType.INT64, is_primary=True)
            schema.add_field("gkey", DataType.VARCHAR, max_length=32)
            schema.add_field("tkey", DataType.VARCHAR, max_length=32)
            schema.add_field("tenant", DataType.VARCHAR, max_length=_MAX["tenant"])
            schema.add_field("grp", DataType.VARCHAR, max_length=_MAX["grp"])
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=_REGISTRY_DIM)
            index = self.client.prepare_index_params()
            index.add_index(field_name="vec", index_type="FLAT", metric_type="L2")
            self.client.create_collection(
                self.groups, schema=schema, index_params=index, consistency_level=self.consistency
            )
        # Idempotent; after a Milvus restart collections must be loaded before they answer.
        self.client.load_collection(self.groups)
        if self.client.has_collection(self.images):
            self._ensure_indexes()
            self.client.load_collection(self.images)
            self._check_model(model_id)
        if not self.client.has_collection(self.images):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("seq", DataType.INT64, is_primary=True)
            schema.add_field("gkey", DataType.VARCHAR, max_length=32, is_partition_key=True)
            schema.add_field("ikey", DataType.VARCHAR, max_length=32)
            for name in ("tenant", "grp", "image_id", "label", "desc", "uri", "tags"):
                schema.add_field(name, DataType.VARCHAR, max_length=_MAX[name])
            schema.add_field("lkey", DataType.VARCHAR, max_length=32)
            schema.add_field("meta", DataType.JSON)
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=self.dim)
            # No indexes here (pymilvus would create them and load): _ensure_indexes, then the load.
            self.client.create_collection(
                self.images,
                schema=schema,
                consistency_level=self.consistency,
                num_partitions=num_partitions,
            )
        self._ensure_indexes()
        self.client.load_collection(self.images)
        # An existing collection keeps the index it was created with, whatever ``index`` says.
        try:
            described = self.client.describe_index(self.images, "vec") or {}
        except Exception:  # noqa: BLE001 (the test double may not describe it: keep the setting)
            described = {}
        self.index_type = str(described.get("index_type") or self.index_type)
        if str(described.get("nlist", "")).isdigit():
            self.nlist = int(described["nlist"])
        # Automatic tags (JSON text) live in their own column; a collection made before it has none, and
        # then stores no tags (keyword search answers "not supported"; recreate the collection to get it).
        names = {f["name"] for f in self.client.describe_collection(self.images)["fields"]}
        self.has_tags = "tags" in names
        self._fields = [*_IMAGE_FIELDS, "tags"] if self.has_tags else list(_IMAGE_FIELDS)
        # Hashed label and desc scalars for filter expressions (a collection made before has neither: its
        # filters run in Python over every match above the threshold).
        self.has_filter_fields = "lkey" in names and "meta" in names
        # What a row rewrite (update_image, set_tags) must carry besides the fields it changes.
        extra = [n for n in ("tags", "lkey", "meta") if n in names]
        self._row_fields = ["gkey", "ikey", "label", "desc", "uri", "vec", *extra]
        # The model that indexed the collection, kept as the registry's row 0 (no tenant hashes to "meta"),
        # with the key of the list markers (tusou.store.markers): kept once made, so markers stay valid
        # across restarts and across the processes sharing the collection.
        key = self._meta().get("marker_key") or new_marker_key().hex()
        meta = json.dumps({"model_id": model_id, "dim": self.dim, "marker_key": key})
        row = {"seq": _META_SEQ, "gkey": "meta", "tkey": "meta", "tenant": "", "grp": meta}
        self.client.upsert(self.groups, [{**row, "vec": [0.0] * _REGISTRY_DIM}])
        self._wrote(self.groups)
        self._schemas.clear()  # a collection dropped and made again above has a new description
        # Processes creating the collection at once each wrote a key: all adopt the one that stayed.
        self._markers = MarkerCodec(bytes.fromhex(self._meta().get("marker_key") or key))
        self._count_groups()

    def _ensure_indexes(self) -> None:
        """Index a new images collection: the scalar keys first (``_SCALAR_INDEXED``), the vector last.

        Milvus loads a collection only once its vector field is indexed, and refuses a new index on a
        loaded collection ("can't change the index for loaded collection"). With the vector's index made
        last, no process can load the collection before every index exists: another process starting on
        the collection meanwhile either finds no vector index and makes the missing ones itself (same
        parameters: Milvus accepts an identical index again), or fails to load and tries again
        (``_setup``). A collection whose vector is indexed already is left as it is: one made before the
        ``ikey`` index keeps scanning for ids (docs/scale.md says how to add it)."""
        from pymilvus import MilvusException

        if self.client.list_indexes(self.images, field_name="vec"):
            return
        # Milvus 2.3 indexes VARCHAR as a Trie; later servers (and Milvus Lite) offer INVERTED. These indexes
        # only make reads faster: a server with neither goes without.
        for field in _SCALAR_INDEXED:
            for kind in ("Trie", "INVERTED"):
                if self.client.list_indexes(self.images, field_name=field):
                    break
                index = self.client.prepare_index_params()
                index.add_index(field_name=field, index_type=kind, index_name=field)
                with contextlib.suppress(MilvusException):
                    self.client.create_index(self.images, index)
        index = self.client.prepare_index_params()
        # FLAT: exact. HNSW: a graph; a range search with ef >= its top-k returns (nearly) every row in
        # range (tests/test_milvus_ann.py measures it).
        index.add_index(
            field_name="vec",
            index_type=self.index_type,
            metric_type="IP",
            params=self._index_params(),
            index_name="vec",
        )
        self.client.create_index(self.images, index)

    def _meta(self) -> dict[str, Any]:
        rows = self.client.query(
            self.groups, filter=f"seq == {_META_SEQ}", output_fields=["grp"], consistency_level="Strong"
        )
        found = json.loads(rows[0]["grp"]) if rows else {}
        return found if isinstance(found, dict) else {}

    def _check_model(self, model_id: str) -> None:
        rows = self.client.query(
            self.groups, filter=f"seq == {_META_SEQ}", output_fields=["grp"], consistency_level="Strong"
        )
        if not rows:
            # No model recorded yet: another process is creating the collection right now (it writes the
            # record last). Dropping it here would pull it from under that process.
            return
        found = json.loads(rows[0]["grp"])
        if found.get("model_id") == model_id and found.get("dim") == self.dim:
            return
        count = self.client.query(
            self.images, filter="", output_fields=["count(*)"], consistency_level="Strong"
        )
        if count and count[0]["count(*)"]:
            raise ModelMismatch(
                f"Milvus collection {self.images} was indexed with model {found.get('model_id')} "
                f"(dim {found.get('dim')}), not {model_id} (dim {self.dim}), and a collection's vectors "
                "cannot change: start on a new collection (TUSOU_MILVUS_COLLECTION) and fill it again, "
                "with tusou import, or with tusou migrate from an embedded folder brought to this model by "
                "tusou upgrade or tusou reembed (docs/operations.md)"
            )
        # Empty: like the embedded store, a new model may take it over (the schema carries the dim).
        self.client.drop_collection(self.images)

    # --- read-your-writes ----------------------------------------------------------------------------
    def _insert_rows(self, collection: str, rows: list[dict]) -> None:
        """Insert ``rows`` (dicts with every field of the collection) column by column: pymilvus's row
        insert converts each value of each row on its own, about 3x slower than the whole batch's columns
        (0.5 ms against 0.16 ms a row at dim 256; bench/scale.py prints the fill rate)."""
        from pymilvus import DataType

        schema = self._schemas.get(collection)
        if schema is None:
            schema = self._schemas[collection] = self.client.describe_collection(collection)
        step = max(1, _INSERT_BYTES // (4 * self.dim))
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            entities = []
            for field in schema["fields"]:
                name = field["name"]
                values: Any = [r[name] for r in chunk]
                if field["type"] == DataType.FLOAT_VECTOR:
                    values = np.asarray(values, dtype=np.float32).reshape(len(chunk), -1).tolist()
                entities.append({"name": name, "type": field["type"], "values": values})
            self.client._get_connection().batch_insert(collection, entities, schema=schema)
        self._wrote(collection)

    def _delete_where(self, collection: str, flt: str) -> None:
        self.client.delete(collection, filter=flt)
        self._wrote(collection)

    def _wrote(self, collection: str) -> None:
        """Record a timestamp at or after this process's write, for its later reads to wait for.

        Milvus 2.3 returns no timestamp for a delete by expression (pymilvus's own Session level therefore
        misses deletes), so the store takes a fresh one from the server's timestamp oracle once the write
        is acknowledged: it is later than the write. Where the server cannot give one, reads of the
        collection fall back to Strong.
        """
        key = (self.uri, collection)
        if self.consistency != "Session" or _WRITTEN.get(key) == -1:
            return
        try:
            ts = self._alloc_timestamp()
        except Exception:  # noqa: BLE001 (no oracle: Strong reads are still correct)
            ts = 0
        with _WRITTEN_LOCK:
            if ts <= 0:
                _WRITTEN[key] = -1
            elif _WRITTEN.get(key, 0) >= 0:
                _WRITTEN[key] = max(_WRITTEN.get(key, 0), ts)

    def _alloc_timestamp(self) -> int:
        """A fresh timestamp from the server's oracle (0 where it has none)."""
        return int(self.client._get_connection().alloc_timestamp())

    def _read_level(self, collection: str, consistency: str | None = None) -> dict[str, Any]:
        """The consistency arguments of a read: ``Session`` waits for this process's last write to the
        collection (a guarantee timestamp, sent as Milvus's Customized level), other levels as named."""
        pinned = self._pinned() if consistency is None else None
        if pinned is not None:
            return {"consistency_level": "Customized", "guarantee_timestamp": pinned}
        level = consistency or self.consistency
        if level != "Session":
            return {"consistency_level": level}
        with _WRITTEN_LOCK:
            ts = _WRITTEN.get((self.uri, collection), 0)
        if ts < 0:
            return {"consistency_level": "Strong"}
        # 1 is Milvus's "eventually" timestamp: no write of this process to wait for.
        return {"consistency_level": "Customized", "guarantee_timestamp": ts or 1}

    def _fresh(self, collection: str, consistency: str | None = None) -> bool:
        """Whether a read at this level sees every write acknowledged before the request (so "not found"
        needs no second, Strong look)."""
        level = self._read_level(collection, consistency)
        return level["consistency_level"] == "Strong" or (consistency is None and self._pinned() is not None)

    def _pinned(self) -> int | None:
        pinned = _PINNED.get()
        return pinned[1] if pinned is not None and pinned[0] == id(self) else None

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Reads inside share one consistency wait: under ``Strong``, one timestamp from the server's oracle
        (after every write acknowledged so far, whichever process made it) becomes the guarantee timestamp
        of every read of the block, so the first read waits for it and later ones find it reached. A search
        by a stored image's id (its vector, then the search) thus waits once, not twice, and sees exactly
        what a Strong read at the start would. Under ``Session`` reads already share this process's last
        write's timestamp. Reads the store makes at Strong on purpose (race checks) stay so. Either way a
        group found once in the block is not looked up again (``_require``).
        """
        if _CHECKED.get() is not None:
            yield  # nested: the outer block's snapshot and checked groups hold
            return
        checked = _CHECKED.set({})
        token = None
        try:
            if self.consistency == "Strong" and self._pinned() is None:
                try:
                    ts = self._alloc_timestamp()
                except Exception:  # noqa: BLE001 (no oracle: plain Strong reads)
                    ts = 0
                token = _PINNED.set((id(self), ts)) if ts > 0 else None
            yield
        finally:
            if token is not None:
                _PINNED.reset(token)
            _CHECKED.reset(checked)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the read pool, in the caller's context (a pinned snapshot travels with it)."""
        return self._pool.submit(contextvars.copy_context().run, fn, *args)

    # --- small helpers -------------------------------------------------------------------------------
    def _query(
        self,
        collection: str,
        flt: str,
        fields: list[str],
        limit: int | None = None,
        consistency: str | None = None,
    ) -> list[dict]:
        kwargs = self._read_level(collection, consistency)
        if limit is not None:
            kwargs["limit"] = limit
        return list(self.client.query(collection, filter=flt, output_fields=fields, **kwargs))

    def _registry_rows(self, tenant: str, group: str, consistency: str | None = None) -> list[dict]:
        flt = f'gkey == "{_key(tenant, group)}"'
        rows = self._query(self.groups, flt, ["seq", "tenant", "grp"], consistency=consistency)
        return sorted(
            (r for r in rows if r["tenant"] == tenant and r["grp"] == group), key=lambda r: r["seq"]
        )

    def _group_seq(self, tenant: str, group: str, consistency: str | None = None) -> int | None:
        rows = self._registry_rows(tenant, group, consistency)
        if not rows and not self._fresh(self.groups, consistency):
            # Not seen at this level: another process may have just created it. "Not exists" is only
            # answered after a Strong look (a rare, failure-path round).
            rows = self._registry_rows(tenant, group, "Strong")
        return rows[0]["seq"] if rows else None

    def _require(self, tenant: str, group: str) -> int:
        """The group's registry seq, or GroupNotFound. Inside ``read_snapshot`` a group is looked up once
        per request: a search by a stored id found its group while reading the vector, and its search
        does not ask again."""
        checked = _CHECKED.get()
        if checked is not None and (id(self), tenant, group) in checked:
            return checked[(id(self), tenant, group)]
        seq = self._group_seq(tenant, group)
        if seq is None:
            raise GroupNotFound(group)
        if checked is not None:
            checked[(id(self), tenant, group)] = seq
        return seq

    def _with_group(self, tenant: str, group: str, read: Callable[[], Any]) -> Any:
        """Run ``read`` alongside the group check, so the call pays one consistency wait, not two."""
        check = self._submit(self._require, tenant, group)
        result = read()
        check.result()
        return result

    def _alone(self, wanted: int) -> bool:
        """Whether the collection holds at most ``wanted`` groups (all tenants), as last counted. Then a read
        of those groups may leave out its ``gkey`` filter: Milvus evaluates that filter on every row of the
        group's partition (with or without its index: 11-14 ms of a search at 2M rows, ~3 ms without any
        filter), and the rows it would keep out are other groups', which every read drops in Python anyway
        (tenant and group compared). A search checks what it got (``search``), so a stale count costs time,
        never an answer. The count is read at start and, once older than ``_GROUPS_TTL_S``, again in the
        background: never on a request's path."""
        count, at = self._groups_seen
        if time.monotonic() - at > _GROUPS_TTL_S and not self._groups_counting.locked():
            self._pool.submit(self._count_groups)
        return 0 <= count <= wanted

    def _count_groups(self) -> None:
        if not self._groups_counting.acquire(blocking=False):
            return
        try:
            rows = self.client.query(
                self.groups,
                filter=f"seq != {_META_SEQ}",
                output_fields=["count(*)"],
                consistency_level="Strong",
            )
            self._groups_seen = (int(rows[0]["count(*)"]) if rows else 0, time.monotonic())
        except Exception:  # noqa: BLE001 (not known: the reads keep their filter)
            self._groups_seen = (-1, time.monotonic())
        finally:
            self._groups_counting.release()

    def _count(self, gkey: str) -> int:
        rows = self._query(self.images, f'gkey == "{gkey}"', ["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def _rows_by_ids(
        self,
        tenant: str,
        group: str,
        ids: Sequence[str],
        fields: list[str],
        consistency: str | None = None,
        unscoped: bool = False,
    ) -> list[dict]:
        # ``unscoped`` (plain reads): the group's filter only where other groups share the collection
        # (_alone); rows of another group with one of these ids are dropped below either way. Reads that
        # lead to a write keep it. (It was once blamed for a row that two processes updating one image
        # left behind; the settle after the write missed that row: see _rewrite_rows.)
        scope = "" if unscoped and self._alone(1) else f'gkey == "{_key(tenant, group)}" and '
        wanted = set(ids)
        rows: list[dict] = []
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), _IN_CHUNK):
            keys = [_key(i) for i in unique[start : start + _IN_CHUNK]]
            flt = scope + _in("ikey", keys)
            wanted_fields = list({"seq", "tenant", "grp", "image_id", *fields})
            rows += self._query(self.images, flt, wanted_fields, consistency=consistency)
        return [r for r in rows if r["tenant"] == tenant and r["grp"] == group and r["image_id"] in wanted]

    def _delete_seqs(self, collection: str, seqs: Sequence[int], gkey: str | None = None) -> None:
        # Scoped to the group where one is named: rows written before sequence numbers came from Milvus's
        # timestamp oracle were unique only per random process tag.
        scope = f'gkey == "{gkey}" and ' if gkey else ""
        for start in range(0, len(seqs), _IN_CHUNK):
            self._delete_where(collection, scope + _in("seq", list(seqs[start : start + _IN_CHUNK])))

    # --- groups --------------------------------------------------------------------------------------
    def create_group(self, tenant: str, group: str, images: Sequence[NewImage]) -> list[ItemError | None]:
        gkey = _key(tenant, group)
        with self._write_lock:
            if self._group_seq(tenant, group, "Strong") is not None:
                raise GroupExists(group)
            (seq,) = self._seqs.take(1)
            row = {"seq": seq, "gkey": gkey, "tkey": _key(tenant), "tenant": tenant, "grp": group}
            self._insert_rows(self.groups, [{**row, "vec": [0.0] * _REGISTRY_DIM}])
            rows = self._registry_rows(tenant, group, "Strong")
            if any(r["seq"] != seq for r in rows):
                # Another process registered it at the same time: of two racing creators the later
                # checker always sees the other, so yielding here never leaves two registrations.
                self._delete_seqs(self.groups, [seq])
                raise GroupExists(group)
            # Rows left by a removal that a crash interrupted must not reappear in the new group. Only
            # rows older than the registration: images added since (by other processes) are newer.
            self._delete_where(self.images, f'gkey == "{gkey}" and seq < {seq}')
            return self._insert(tenant, group, seq, 0, set(), images)

    def add_images(self, tenant: str, group: str, images: Sequence[NewImage]) -> list[ItemError | None]:
        gkey = _key(tenant, group)
        with self._write_lock:
            group_seq = self._submit(self._group_seq, tenant, group)
            count = self._submit(self._count, gkey)
            existing = self._rows_by_ids(tenant, group, [im.id for im in images], [])
            if (seq := group_seq.result()) is None:
                raise GroupNotFound(group)
            return self._insert(tenant, group, seq, count.result(), {r["image_id"] for r in existing}, images)

    def _insert(
        self,
        tenant: str,
        group: str,
        group_seq: int,
        count: int,
        taken: set[str],
        images: Sequence[NewImage],
        settle: bool = True,
    ) -> list[ItemError | None]:
        gkey = _key(tenant, group)
        results: list[ItemError | None] = []
        rows: list[dict] = []
        for image in images:
            if count >= self.group_max_images:
                results.append(ItemError(406, "group is full"))
                continue
            if image.id in taken:
                results.append(ItemError(400, "id already exists"))
                continue
            fields = {
                "tenant": tenant,
                "grp": group,
                "image_id": image.id,
                "label": image.label,
                "desc": _dump_desc(image.desc),
                "uri": image.uri or "",
            }
            if self.has_tags:
                fields["tags"] = _dump_tags(image.tags)
            if self.has_filter_fields:
                fields["lkey"] = _key("label", image.label)
            too_long = [k for k, v in fields.items() if len(v.encode()) > _MAX[k]]
            if too_long:
                results.append(ItemError(400, f"{too_long[0]} too long"))
                continue
            vector = np.ascontiguousarray(image.vector, dtype=np.float32).reshape(self.dim)
            row: dict[str, Any] = {"gkey": gkey, "ikey": _key(image.id), **fields, "vec": vector}
            if self.has_filter_fields:
                row["meta"] = _meta(image.desc)
            rows.append(row)
            taken.add(image.id)
            results.append(None)
            count += 1
        if not rows:
            return results
        for row, seq in zip(rows, self._seqs.take(len(rows)), strict=True):
            row["seq"] = seq
        self._insert_rows(self.images, rows)
        if settle:
            self._settle(tenant, group, group_seq, rows, images, results)
        return results

    def _add_unchecked(self, tenant: str, group: str, images: Sequence[NewImage]) -> list[ItemError | None]:
        """Bulk loading for the benchmark: ``add_images`` without the reads that guard against repeated ids
        (before and after the insert), which grow with the group. Only for ids known to be new, in a group
        no other process writes to meanwhile."""
        with self._write_lock:
            seq = self._require(tenant, group)
            count = self._count(_key(tenant, group))
            return self._insert(tenant, group, seq, count, set(), images, settle=False)

    def _settle(
        self,
        tenant: str,
        group: str,
        group_seq: int,
        rows: list[dict],
        images: Sequence[NewImage],
        results: list[ItemError | None],
    ) -> None:
        """After inserting: yield ids another process took meanwhile; undo if the group went away."""
        mine = {row["image_id"]: row["seq"] for row in rows}
        # Strong: these checks must see what other processes wrote meanwhile.
        registry = self._submit(self._group_seq, tenant, group, "Strong")
        found = self._rows_by_ids(tenant, group, list(mine), [], "Strong")
        if registry.result() != group_seq:
            # Removed (or removed and recreated) while we wrote: these rows belong to no group.
            self._delete_seqs(self.images, list(mine.values()), _key(tenant, group))
            raise GroupNotFound(group)
        lost = {r["image_id"] for r in found if r["seq"] != mine[r["image_id"]]}
        if not lost:
            return
        self._delete_seqs(self.images, [mine[i] for i in lost], _key(tenant, group))
        for i, image in enumerate(images):
            if results[i] is None and image.id in lost:
                results[i] = ItemError(400, "id already exists")

    def remove_group(self, tenant: str, group: str) -> None:
        gkey = _key(tenant, group)
        with self._write_lock:
            rows = self._registry_rows(tenant, group, "Strong")
            if not rows:
                raise GroupNotFound(group)
            # Images first: a crash part-way leaves a group that still exists and can be removed again.
            self._delete_where(self.images, f'gkey == "{gkey}"')
            self._delete_seqs(self.groups, [r["seq"] for r in rows])
            # A concurrent add that passed its group check before the registry row went is swept here;
            # one that checks after finds the group gone and undoes itself (see _settle).
            self._delete_where(self.images, f'gkey == "{gkey}"')

    def delete_images(self, tenant: str, group: str, ids: Sequence[str]) -> int:
        with self._write_lock:
            rows = self._with_group(tenant, group, lambda: self._rows_by_ids(tenant, group, ids, []))
            self._delete_seqs(self.images, [r["seq"] for r in rows], _key(tenant, group))
        return len({r["image_id"] for r in rows})

    # --- reads ---------------------------------------------------------------------------------------
    def list_groups(self, tenant: str) -> list[str]:
        rows = self._query(self.groups, f'tkey == "{_key(tenant)}"', ["seq", "tenant", "grp"])
        rows.sort(key=lambda r: r["seq"])
        return list(dict.fromkeys(r["grp"] for r in rows if r["tenant"] == tenant))

    def count(self, tenant: str, group: str) -> int:
        return self._with_group(tenant, group, lambda: self._count(_key(tenant, group)))

    def totals(self) -> tuple[int, int]:
        # Two count(*) reads in one round. A group two processes created at once may count twice for the
        # moment it takes the loser to delete its registry row (see "Repeated ids" above).
        groups = self._submit(self._query, self.groups, f"seq != {_META_SEQ}", ["count(*)"])
        images = self._query(self.images, "", ["count(*)"])
        return int(groups.result()[0]["count(*)"]), int(images[0]["count(*)"])

    def list_images(self, tenant: str, group: str, marker: str, limit: int) -> tuple[list[ImageInfo], str]:
        after = self._markers.decode(tenant, group, marker)
        gkey = _key(tenant, group)
        flt = f'gkey == "{gkey}" and seq > {after}'

        def page() -> list[dict]:
            # The server returns the smallest primary keys for query(limit=): seq order, explicitly
            # re-sorted below.
            return self._page_rows(flt, limit + 1)

        rows = _newest(sorted(self._with_group(tenant, group, page), key=lambda r: r["seq"]))[: limit + 1]
        more = len(rows) > limit
        rows = rows[:limit]
        infos = [
            ImageInfo(r["image_id"], r["label"], _load_desc(r["desc"]), r["uri"] or None, _load_tags(r))
            for r in rows
        ]
        return infos, (self._markers.encode(tenant, group, rows[-1]["seq"]) if more else "")

    def _page_rows(self, flt: str, limit: int) -> list[dict]:
        """The ``limit`` rows with the smallest seq matching ``flt`` (in any order)."""
        return self._query(self.images, flt, self._fields, limit=limit)

    def _image_row(
        self, tenant: str, group: str, image_id: str, fields: list[str], unscoped: bool = False
    ) -> dict:
        # The row found shows that its group exists (as in ``search``): the registry is read only when not.
        rows = self._rows_by_ids(tenant, group, [image_id], fields, unscoped=unscoped)
        if not rows:
            self._require(tenant, group)
        if not rows and not self._fresh(self.images):
            # As for groups: "not found" only after a Strong look (another process may have just added it).
            rows = self._rows_by_ids(tenant, group, [image_id], fields, "Strong")
        if not rows:
            raise ImageNotFound(image_id)
        (newest,) = _newest(sorted(rows, key=lambda r: r["seq"]))
        newest["_stale"] = [r["seq"] for r in rows if r is not newest]
        return newest

    def get_image(self, tenant: str, group: str, image_id: str) -> ImageInfo:
        r = self._image_row(
            tenant, group, image_id, ["label", "desc", "uri", *self._fields[len(_IMAGE_FIELDS) :]]
        )
        return ImageInfo(r["image_id"], r["label"], _load_desc(r["desc"]), r["uri"] or None, _load_tags(r))

    def update_image(
        self, tenant: str, group: str, image_id: str, *, label: str | None = None, desc: Any = KEEP
    ) -> ImageInfo:
        # Milvus updates by rewriting the whole row, vector included.
        with self._write_lock:
            row = self._image_row(tenant, group, image_id, self._row_fields)
            if label is not None:
                row["label"] = label
                if self.has_filter_fields:
                    row["lkey"] = _key("label", label)
            if desc is not KEEP:
                row["desc"] = _dump_desc(desc)
                if self.has_filter_fields:
                    row["meta"] = _meta(desc)
            too_long = [k for k in ("label", "desc") if len(row[k].encode()) > _MAX[k]]
            if too_long:
                raise StoreError(f"{too_long[0]} too long")
            self._rewrite(row, row.pop("_stale"), settle=True)
        return ImageInfo(
            row["image_id"], row["label"], _load_desc(row["desc"]), row["uri"] or None, _load_tags(row)
        )

    def _rewrite(self, row: dict, stale: list[int], settle: bool = False) -> None:
        """Write ``row`` as its next version, then delete the version read (and any ``stale`` ones): the
        image exists throughout, twice for a moment, never zero times (see *Updates* above)."""
        self._rewrite_rows([row], [stale], settle)

    def _rewrite_rows(self, rows: list[dict], stales: list[list[int]], settle: bool = False) -> None:
        """``_rewrite`` of rows of one group, in one insert and one delete.

        ``settle``: then count, at Strong (every process's writes), the rows under each new key and under
        the key after it: one in all when no update raced this one. Two races leave more:

        * Both read the same version and wrote the same next one: two rows under one primary key, which
          every read shows once but count(*) counts twice. Of two such writers at least one sees the
          other's row (each counts after its own write, so the later one's count comes after the earlier
          one's write). It writes its row once more as the version after, which deletes both copies.
          Both may see it and do so together: each retries after a random pause that doubles each time,
          at most six times.
        * A newer version stands under the key after this one: another process updated the image since
          this update's read (a Session read waits only for this process's writes). This row is the
          older one: it deletes its own key only, and the newer update stands, as if this one had come
          first. It never deletes the newer row, so two such writers cannot delete each other's.

        The settle counts and deletes only keys of the row's own listing position (its versions): a row of
        another image, or of the same id added again after a delete, is never its to remove. One count
        covers the whole batch; only a batch whose count is not exact counts row by row."""
        if not rows:
            return
        gkey = rows[0]["gkey"]
        olds = [row["seq"] for row in rows]
        for row in rows:
            row["vec"] = np.asarray(row["vec"], dtype=np.float32)
        todo = list(range(len(rows)))
        for attempt in range(_REWRITE_TRIES if settle else 1):
            for i in todo:
                rows[i]["seq"] = _next_version(olds[i])
            self._insert_rows(self.images, [rows[i] for i in todo])
            gone = [s for i in todo for s in (olds[i], *stales[i]) if s != rows[i]["seq"]]
            self._delete_seqs(self.images, gone, gkey)
            if not settle:
                return
            watched = [s for i in todo for s in (rows[i]["seq"], _next_version(rows[i]["seq"]))]
            if len(todo) > 1 and self._rows_under(gkey, watched) == len(todo):
                return
            copies = []
            for i in todo:
                seq = rows[i]["seq"]
                if self._rows_under(gkey, [seq, _next_version(seq)]) <= 1:
                    continue
                if self._query(
                    self.images,
                    f'gkey == "{gkey}" and seq == {_next_version(seq)}',
                    ["seq"],
                    consistency="Strong",
                ):
                    self._delete_seqs(self.images, [seq], gkey)  # a newer version stands: ours is the older
                else:
                    copies.append(i)
            todo = copies
            if not todo:
                return
            time.sleep(random.uniform(0.0, 0.05 * 2**attempt))
            for i in todo:
                olds[i], stales[i] = rows[i]["seq"], []

    def _rows_under(self, gkey: str, seqs: Sequence[int]) -> int:
        """Rows stored under these primary keys, copies included (count(*) counts copies that every other
        read shows once), at Strong: other processes' rows too."""
        total = 0
        for start in range(0, len(seqs), _IN_CHUNK):
            flt = f'gkey == "{gkey}" and {_in("seq", [int(s) for s in seqs[start : start + _IN_CHUNK]])}'
            rows = self._query(self.images, flt, ["count(*)"], consistency="Strong")
            total += int(rows[0]["count(*)"]) if rows else 0
        return total

    def set_tags(self, tenant: str, group: str, tags: dict[str, list[list[float]]]) -> int:
        """Rewrite the images' rows with new tags, as ``update_image`` does (next version, then delete the
        one read, then settle a collision with a racing update: count stays exact)."""
        if not self.has_tags:
            return super().set_tags(tenant, group, tags)
        with self._write_lock:
            fields = self._row_fields
            rows = self._with_group(
                tenant, group, lambda: self._rows_by_ids(tenant, group, list(tags), fields)
            )
            by_id: dict[str, list[int]] = {}
            for row in rows:
                by_id.setdefault(row["image_id"], []).append(row["seq"])
            newest = _newest(sorted(rows, key=lambda r: r["seq"]))
            stales = []
            for row in newest:
                row["tags"] = _dump_tags(tags[row["image_id"]])
                stales.append([s for s in by_id[row["image_id"]] if s != row["seq"]])
            self._rewrite_rows(newest, stales, settle=True)
        return len(newest)

    def search_tags(
        self,
        tenant: str,
        groups: Sequence[str],
        classes: Sequence[int],
        limit: int,
        min_evidence: float,
        where: Filter | None = None,
    ) -> Hits:
        """Every row of the groups is read (by seq pages) and its tags summed here in Python: Milvus 2.3
        cannot sum inside JSON text. Cost grows with the groups' size (docs/words.md)."""
        if not self.has_tags:
            return super().search_tags(tenant, groups, classes, limit, min_evidence, where)
        wanted = {int(c) for c in classes}
        found: list[tuple[float, int, dict]] = []
        for group in dict.fromkeys(groups):
            self._require(tenant, group)
            gkey = _key(tenant, group)
            after = 0
            pre = _expr(where) if where is not None and self.has_filter_fields else ""
            while True:
                flt = f'gkey == "{gkey}" and seq > {after}' + (f" and ({pre})" if pre else "")
                rows = sorted(self._page_rows(flt, TOPK_CAP), key=lambda r: r["seq"])
                for r in _newest(rows):
                    if r["tenant"] != tenant or r["grp"] != group:
                        continue
                    tags = _load_tags(r) or []
                    ev = min(1.0, sum(float(p) for i, p in tags if int(i) in wanted))
                    if (
                        ev >= min_evidence
                        and ev > 0
                        and (where is None or where.matches(r["label"], _load_desc(r["desc"])))
                    ):
                        found.append((ev, int(r["seq"]), r))
                if len(rows) < TOPK_CAP:
                    break
                after = rows[-1]["seq"]
        found.sort(key=lambda item: (-item[0], item[1]))
        if limit >= 0:
            found = found[:limit]
        return Hits.of(
            Hit(
                r["grp"],
                r["image_id"],
                r["label"],
                _load_desc(r["desc"]),
                r["uri"] or None,
                ev,
                _load_tags(r),
            )
            for ev, _, r in found
        )

    def get_vector(self, tenant: str, group: str, image_id: str) -> np.ndarray:
        r = self._image_row(tenant, group, image_id, ["vec"], unscoped=True)
        return np.asarray(r["vec"], dtype=np.float32)

    def search(
        self,
        tenant: str,
        groups: Sequence[str],
        queries: np.ndarray,
        limit: int,
        min_cosine: float,
        where: Filter | None = None,
    ) -> Hits:
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        groups = list(dict.fromkeys(groups))
        names = {_key(tenant, g): g for g in groups}
        flt = _in("gkey", list(names))
        # A filter: as an expression on the hashed columns when the collection has them (Milvus scores only
        # the rows it selects, so the limit counts passing images); else in Python over every match above
        # the threshold. Either way Filter.matches below has the last word.
        pre = _expr(where) if where is not None and self.has_filter_fields else ""
        if pre:
            flt = f"{flt} and ({pre})"
        want = -1 if where is not None and not pre else limit
        answer = None
        if where is None and self._alone(len(groups)):
            # No other group in the collection (as last counted): search without the gkey filter (see
            # _alone). Rows returned at or above min_cosine that belong to another group (one made since)
            # could have taken places of the groups' rows: then search again with the filter. Rows below it
            # take no place that a row of the groups above it could have had.
            answer = self._best(tenant, names, queries, "", want, min_cosine, where)
            if answer[3]:
                answer = None
        best, refused, present, _ = answer or self._best(tenant, names, queries, flt, want, min_cosine, where)
        if refused and 0 <= limit and len(best) < limit:
            # The expression let through rows the exact check refused (e.g. true for 1), which took places
            # in the answer: ask again for every match.
            best, _, more, _ = self._best(tenant, names, queries, flt, -1, min_cosine, where)
            present |= more
        # The existence check folded into the search: a group the search found rows of exists (its rows are
        # removed before its registry row, and an add that finds its group gone removes its own rows), so
        # only a group without any is looked up in the registry, after the search (GroupNotFound if gone).
        for check in [self._submit(self._require, tenant, g) for g in groups if g not in present]:
            check.result()
        # An image left with two versions by an interrupted update counts once, as its newer version.
        keep = {e["seq"] for e in _newest(sorted((e for _, e in best.values()), key=lambda e: e["seq"]))}
        found = sorted(
            ((seq, hit) for seq, hit in best.items() if seq in keep), key=lambda item: (-item[1][0], item[0])
        )
        if limit >= 0:
            found = found[:limit]
        return Hits.of(
            Hit(
                e["grp"],
                e["image_id"],
                e["label"],
                _load_desc(e["desc"]),
                e["uri"] or None,
                cosine,
                _load_tags(e),
            )
            for _, (cosine, e) in found
        )

    def _best(
        self,
        tenant: str,
        names: dict[str, str],
        queries: np.ndarray,
        flt: str,
        limit: int,
        min_cosine: float,
        where: Filter | None,
    ) -> tuple[dict[int, tuple[float, dict]], int, set[str], int]:
        """seq -> (best cosine over the views, entity) of the rows that pass ``where``, how many rows the
        search returned that ``where`` refused, the groups it returned rows of, and how many rows of other
        groups it returned (all at or above ``min_cosine``)."""
        best: dict[int, tuple[float, dict]] = {}
        refused = foreign = 0
        present: set[str] = set()
        for found in self._search_views(queries, flt, limit, min_cosine):
            for cosine, entity in found:
                if entity["tenant"] != tenant or names.get(_key(tenant, entity["grp"])) != entity["grp"]:
                    foreign += 1  # another group's row (without the filter), or a hash collision
                    continue  # never shown
                present.add(entity["grp"])
                if where is not None and not where.matches(entity["label"], _load_desc(entity["desc"])):
                    refused += 1
                    continue
                seq = int(entity["seq"])
                if seq not in best or cosine > best[seq][0]:
                    best[seq] = (cosine, entity)
        return best, refused, present, foreign

    def _search_views(
        self, views: np.ndarray, flt: str, limit: int, min_cosine: float
    ) -> list[list[tuple[float, dict]]]:
        """``_search_view`` of each view; on an IVF index the views' first bands are one search call."""
        if not self.index_type.startswith("IVF") or min_cosine >= 1.0 + 1e-3:
            return [self._search_view(view, flt, limit, min_cosine) for view in views]
        want = TOPK_CAP if limit < 0 or limit > TOPK_CAP else max(limit, 1)
        firsts = self._ivf_band(views, flt, want, min_cosine)
        return [
            self._search_view(view, flt, limit, min_cosine, first)
            for view, first in zip(views, firsts, strict=True)
        ]

    def _search_view(
        self,
        view: np.ndarray,
        flt: str,
        limit: int,
        min_cosine: float,
        first: tuple[list[tuple[float, dict]], bool] | None = None,
    ) -> list[tuple[float, dict]]:
        """Every row with cosine >= min_cosine, best first, at most ``limit`` (-1: no limit).

        One range search when the limit fits under Milvus's top-k cap; otherwise bands: each next band
        ends (inclusive) at the lowest cosine of the last one, and rows seen already are skipped.
        """
        want = TOPK_CAP if limit < 0 or limit > TOPK_CAP else max(limit, 1)
        upper = 1.0 + 1e-3
        if min_cosine >= upper:
            return []  # unit vectors: no cosine above 1
        seen: dict[int, tuple[float, dict]] = {}
        if self.index_type.startswith("IVF"):
            # The first band as a top-k search (see _ivf_band); bands beyond it, rare, by range search.
            above, full = first or self._ivf_band(view[None, :], flt, want, min_cosine)[0]
            for cosine, entity in above:
                seen.setdefault(entity["seq"], (cosine, entity))
            if full and not 0 <= limit <= len(seen):
                upper = min(c for c, _ in above)
            else:
                found = sorted(seen.values(), key=lambda item: (-item[0], item[1]["seq"]))
                return found if limit < 0 else found[:limit]
        while True:
            hits = self._range_search(view, flt, want, min_cosine, upper)
            fresh = 0
            for cosine, entity in hits:
                if cosine >= min_cosine and entity["seq"] not in seen:
                    seen[entity["seq"]] = (cosine, entity)
                    fresh += 1
            lowest = min((c for c, _ in hits), default=min_cosine - 1)
            # Done when the band was not full, enough was found, or it already reached below min_cosine.
            if len(hits) < want or 0 <= limit <= len(seen) or lowest < min_cosine:
                break
            if fresh == 0 or lowest >= upper:
                # More than a whole top-k of rows tie at one cosine: no band can split them.
                raise RuntimeError("too many equal scores to page through; lower the limit")
            upper = lowest
        found = sorted(seen.values(), key=lambda item: (-item[0], item[1]["seq"]))
        return found if limit < 0 else found[:limit]

    def _ivf_band(
        self, views: np.ndarray, flt: str, want: int, min_cosine: float
    ) -> list[tuple[list[tuple[float, dict]], bool]]:
        """On an IVF index, per view, the ``want`` best rows by a top-k search over ``nprobe`` lists per
        segment: (those with cosine >= min_cosine, whether all ``want`` were). The views go in one call.
        A band for every match searches ``_WIDE_NPROBE`` times more lists (``_nprobe``).

        Not a range search: Milvus 2.3.5's IVF range search ignores nprobe and misses rows well inside its
        radius (recall 0.992 per view at the default threshold against 0.9999 for top-k with 32 of 1024 lists;
        docs/scale.md). A large ``want`` asks for ids only and reads the fields of the rows above the
        threshold by primary key, so rows below it cost 16 bytes each, not their fields; it asks for 2048
        rows first, and for all ``want`` only for a view whose 2048 all matched (a top-k of 16384 costs
        about 5x one of 2048)."""
        inline = want <= _INLINE_FIELDS
        k = want if inline else min(want, _IVF_FIRST_K)
        out: list[tuple[list[tuple[float, dict]], bool]] = [([], False)] * len(views)
        todo = list(range(len(views)))
        while todo:
            result = self.client.search(
                self.images,
                data=[views[i].tolist() for i in todo],
                filter=flt,
                limit=k,
                output_fields=self._fields if inline else ["seq"],
                search_params={"metric_type": "IP", "params": {"nprobe": self._nprobe(inline)}},
                anns_field="vec",
                **self._read_level(self.images),
            )
            again = []
            for i, answer in zip(todo, result, strict=True):
                hits = [(float(hit["distance"]), hit["entity"]) for hit in answer]
                above = [(c, e) for c, e in hits if c >= min_cosine]
                full = len(hits) >= k and len(above) == len(hits)
                out[i] = (above, full)
                if full and k < want:
                    again.append(i)  # more than the first k matched: once more, the whole band
            todo, k = again, want
        if inline:
            return out
        seqs = sorted({int(e["seq"]) for above, _ in out for _, e in above})
        parts = [
            self._submit(self._query, self.images, _in("seq", seqs[i : i + _IN_CHUNK]), self._fields)
            for i in range(0, len(seqs), _IN_CHUNK)
        ]
        rows = {int(r["seq"]): r for part in parts for r in part.result()}
        # A row deleted between the search and this read is gone.
        return [
            ([(c, rows[int(e["seq"])]) for c, e in above if int(e["seq"]) in rows], full)
            for above, full in out
        ]

    def _nprobe(self, narrow: bool) -> int:
        """IVF lists to search: ``nprobe`` for a few best rows, ``_WIDE_NPROBE`` times more for all."""
        return self.nprobe if narrow else max(self.nprobe, min(self.nprobe * _WIDE_NPROBE, self.nlist))

    def _range_search(
        self, view: np.ndarray, flt: str, limit: int, min_cosine: float, upper: float
    ) -> list[tuple[float, dict]]:
        params: dict[str, Any] = {"metric_type": "IP", "params": {}}
        if min_cosine > -1.0 or upper <= 1.0:
            radius = max(min_cosine - _RADIUS_SLACK, -1.0 - 2 * _RADIUS_SLACK)
            params["params"] = {"radius": radius, "range_filter": upper}
        if self.index_type == "HNSW":
            params["params"]["ef"] = min(max(limit, _HNSW_MIN_EF), _HNSW_MAX_EF)
        elif self.index_type.startswith("IVF"):
            params["params"]["nprobe"] = self._nprobe(limit <= _INLINE_FIELDS)
        result = self.client.search(
            self.images,
            data=[view.tolist()],
            filter=flt,
            limit=limit,
            output_fields=self._fields,
            search_params=params,
            anns_field="vec",
            **self._read_level(self.images),
        )
        return [(float(hit["distance"]), hit["entity"]) for hit in result[0]]

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return  # the service closes its store; an owner that also does is harmless
        self._closed = True
        self._pool.shutdown(wait=False)
        self.client.close()
