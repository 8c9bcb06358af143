"""Every setting of tusou in one place.

Each field can be set by an environment variable named ``TUSOU_<FIELD>`` (``TUSOU_DATA``,
``TUSOU_DEFAULT_THRESHOLD``, ...); the CLI options of ``tusou serve`` override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUSOU_", extra="ignore")

    # --- server ---
    data: Path = Field(default=Path("./tusou-data"), description="Data folder: database, model cache.")
    host: str = "127.0.0.1"
    port: int = 8000
    public_host: str | None = Field(
        default=None,
        description="Host[:port] clients sign when tusou runs behind a proxy that rewrites Host.",
    )
    max_date_skew_s: int = Field(
        default=900, description="X-Qiniu-Date further off than this is refused (403)."
    )

    # --- storage ---
    store: str = Field(default="sqlite", description="sqlite (embedded, default) or milvus.")
    milvus_uri: str = Field(default="http://127.0.0.1:19530", description="Milvus server address (http://host:19530).")
    milvus_token: str | None = None
    milvus_user: str | None = None
    milvus_password: str | None = None
    milvus_collection: str = Field(default="tusou_images", description="Collection name (prefix) in Milvus.")
    milvus_consistency: str = Field(
        default="Session",
        description=(
            "Read consistency: Session (read-your-writes per process, other processes' writes within the "
            "bound in docs/scale.md) or Strong (every read waits for every process's writes)."
        ),
    )

    milvus_index: str = Field(
        default="FLAT",
        description="Vector index of a new Milvus collection: FLAT (exact), IVF_FLAT, IVF_SQ8 or HNSW "
        "(docs/scale.md).",
    )
    milvus_nprobe: int = Field(
        default=8, ge=1, description="IVF indexes: inverted lists searched per segment (of milvus_nlist)."
    )
    milvus_nlist: int = Field(
        default=128,
        ge=1,
        le=65536,
        description="IVF indexes: inverted lists per segment of a new Milvus collection (docs/scale.md).",
    )

    # --- model ---
    model: str = Field(
        default="lite0",
        description="lite0, lite1, lite2, onnx (a user-supplied image encoder) or clip (a user-supplied "
        "CLIP-class model: image and text encoders, see clip_dir).",
    )
    clip_dir: Path | None = Field(
        default=None,
        description="With model=clip: a folder with visual/model.onnx, textual/model.onnx and "
        "textual/tokenizer.json (immich's layout; docs/words.md).",
    )
    onnx_path: Path | None = Field(default=None, description="With model=onnx: the encoder's .onnx file.")
    onnx_input_size: int = 224
    onnx_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    onnx_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    model_dir: Path | None = Field(
        default=None,
        description="Folder of the built ONNX graphs; default <data>/models. May be read-only once built "
        "(a container image builds it at build time).",
    )
    model_precision: Literal["fp32", "int8"] = Field(
        default="fp32",
        description="Built-in models: fp32, or int8 (the graph quantized with shipped calibration ranges; "
        "faster, slightly different vectors, see docs/score.md). A data folder keeps the precision it was "
        "indexed with.",
    )
    model_input_size: int | None = Field(
        default=None,
        ge=96,
        le=448,
        multiple_of=32,
        description="Built-in models: the side of the square image the network sees; None = the model's own "
        "(224 for lite0). 192 costs ~0.73 of the network's work, and some quality (docs/score.md). "
        "A data folder keeps the input size it was indexed with.",
    )
    threads: int = Field(default=0, description="ONNX Runtime intra-op threads; 0 = one per core.")
    default_threshold: float | None = Field(
        default=None, description="System score threshold; None = the model's calibrated default."
    )
    tags: bool = Field(
        default=True,
        description="Store automatic tags (the classifier's top concepts) with each new image; they feed "
        "keyword search (data.text). Built-in models only.",
    )

    # --- limits (Qiniu's unless noted) ---
    group_max_images: int = 500_000
    max_groups_per_key: int = Field(
        default=100_000,
        ge=0,
        description="Groups one access key may hold (tusou's; Qiniu named none): each costs memory even "
        "when empty (~6.5 KB in the embedded store), so one key cannot grow the server without bound. "
        "0: no limit.",
    )
    search_max_groups: int = 2
    search_max_limit: int = 10_000
    max_batch_images: int = Field(default=1000, description="Images in one new/add request.")
    max_body_bytes: int = Field(default=256 * 1024 * 1024, description="Largest request body read.")
    pre_auth_body_bytes: int = Field(
        default=1024 * 1024,
        description="Body bytes held in memory before the signature is verified; the rest of a larger body "
        "waits in an unlinked temporary file in the data folder until it is.",
    )
    qbox: bool = Field(
        default=True,
        description="Accept 'QBox AK:sign' signatures. QBox signs the path and query only (and a form "
        "body), never a JSON body: a captured QBox request can be replayed with any body. Set false when "
        "every client uses the Qiniu scheme (QiniuMacAuth).",
    )
    desc_max_bytes: int = 4096

    # --- fetching image URLs (untrusted work) ---
    fetch_timeout_s: float = 10.0
    fetch_connect_timeout_s: float = 3.0
    fetch_max_bytes: int = 10 * 1024 * 1024
    fetch_max_redirects: int = 3
    fetch_allow: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDR ranges that may be fetched although private (tests, intranets).",
    )
    fetch_user_agent: str = "tusou/0.1 (+image search)"
    fetch_max_concurrent: int = Field(default=16, description="Downloads at once, all tenants together.")
    fetch_max_per_tenant: int = Field(
        default=4, description="Downloads of one access key at once; its other URLs wait their turn."
    )

    # --- decoding (untrusted work) ---
    decode_max_pixels: int = Field(
        default=2 * 4999 * 4999,
        description="Decoded pixels the server holds at once, all requests together (a 4999x4999 image is "
        "25M). Peak memory for decoding is about 4-8 bytes per pixel of this budget.",
    )
    decode_wait_s: float = Field(
        default=30.0, description="How long an image waits for its share of decode_max_pixels before 503."
    )

    # --- abuse limits ---
    rate_limit_per_s: float = Field(default=50.0, description="Requests per second per access key; 0 = off.")
    rate_limit_burst: int = Field(default=100, description="Requests a key may send at once before 429.")
    embed_batch: int = Field(default=16, description="Most images in one model call, across requests.")
    heavy_threads: int = Field(
        default=8,
        description="Threads for requests that process images (new, add, search), apart from the shared "
        "pool that serves the light ones (info, list, image, delete).",
    )
    heavy_per_tenant: int = Field(
        default=4, description="Of heavy_threads, how many one access key may hold at once; its other "
        "new/add/search requests wait their turn without holding a thread.",
    )
    verify: bool = Field(
        default=True,
        description="Check the best candidates of an image search scoring 0.4-0.85 with keypoints (ORB + "
        "RANSAC): a verified copy scores at least 0.85, a candidate in 0.70-0.85 that contradicts a copy "
        "drops by 0.15; keeps ~12 KB of keypoints per stored image (keypoints.db; docs/score.md). false: "
        "scores are the CNN's alone and no keypoints are kept.",
    )
    thumbnails: bool = Field(
        default=True,
        description="Keep a small JPEG (at most 128 px, 16 KB) per stored image for the web page "
        "(thumbs.db in the data folder); false keeps none.",
    )
    metrics: bool = Field(default=True, description="Serve GET /metrics (Prometheus; no tenant data).")
    metrics_token: str | None = Field(
        default=None, description="If set, /metrics requires Authorization: Bearer <token>."
    )

    @field_validator("model_input_size", mode="before")
    @classmethod
    def _empty_means_native(cls, value: object) -> object:
        # The Dockerfile passes its INPUT_SIZE build argument on as TUSOU_MODEL_INPUT_SIZE, empty by default.
        return None if value == "" else value

    @property
    def db_path(self) -> Path:
        return self.data / "tusou.db"

    @property
    def model_cache(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.data / "models"
