"""Request and response shapes of Qiniu's API, for the OpenAPI description.

Handlers parse bodies themselves (JSON or form-encoded, as Qiniu's SDKs send either) and answer with the
exact wire shapes; these models document those shapes and let tools such as schemathesis generate requests.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Attribute(BaseModel):
    id: str | None = Field(default=None, description="Image id; generated when empty.")
    label: str | None = None
    desc: Any = Field(default=None, description="Any JSON value, at most 4096 bytes.")


class ImageEntry(BaseModel):
    uri: str = Field(description="http(s) URL or data:application/octet-stream;base64,... URI.")
    attribute: Attribute | None = None


class BatchRequest(BaseModel):
    data: list[ImageEntry]


class ItemErrorModel(BaseModel):
    code: int
    message: str


class BatchResponse(BaseModel):
    images: list[str] = Field(description="Id of each image, or '' where it failed; index for index.")
    errors: list[ItemErrorModel | None] = Field(description="null where the image was stored.")


class DeleteRequest(BaseModel):
    images: list[str]


class ImageRequest(BaseModel):
    id: str


class SearchData(BaseModel):
    uri: str | None = Field(default=None, description="The query image (required unless id is given).")
    id: str | None = Field(default=None, description="tusou extension: search with this stored image.")
    group: str | None = Field(default=None, description="With id: its group (default: the first searched).")


class SearchParams(BaseModel):
    groups: list[str] = Field(description="At most 2 groups.")
    limit: int | None = Field(default=1, description="1..10000, or -1 for every match.")
    threshold: float | None = Field(default=None, description="0..1; raised to the system default.")
    labels: list[str] | None = Field(
        default=None, description="tusou extension: only hits with these labels."
    )


class SearchRequest(BaseModel):
    data: SearchData
    params: SearchParams


class LegacySearchParams(BaseModel):
    limit: int | None = 1
    threshold: float | None = None
    labels: list[str] | None = None


class UpdateRequest(BaseModel):
    """tusou extension: change a stored image's label and/or desc; absent fields stay as they are."""

    id: str
    label: str | None = None
    desc: Any = None


class LegacySearchRequest(BaseModel):
    data: SearchData
    params: LegacySearchParams | None = None


class Envelope(BaseModel):
    code: int = 0
    message: str = ""


class GroupsResponse(Envelope):
    result: list[str]


class InfoResponse(BaseModel):
    count: int


class ImageValue(BaseModel):
    label: str
    desc: Any


class ListedImage(BaseModel):
    id: str
    value: ImageValue


class ImagesResponse(Envelope):
    marker: str
    result: list[ListedImage]


class ImageResponse(BaseModel):
    label: str
    desc: Any


class SearchHit(BaseModel):
    id: str
    label: str
    score: float
    desc: Any
    group: str | None = None
    uri: str | None = None


class SearchResponse(Envelope):
    result: list[SearchHit]


class ErrorResponse(BaseModel):
    error: str
