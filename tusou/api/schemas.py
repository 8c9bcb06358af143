"""Response shapes of Qiniu's API, for the OpenAPI description.

Handlers answer with the exact wire shapes that :mod:`tusou.api.qiniu` renders; these models document
them. The request bodies, whose limits come from Settings, are :func:`tusou.api.qiniu.request_models`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ItemErrorModel(BaseModel):
    code: int
    message: str


class BatchResponse(BaseModel):
    images: list[str] = Field(description="Id of each image, or '' where it failed; index for index.")
    errors: list[ItemErrorModel | None] = Field(description="null where the image was stored.")


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
