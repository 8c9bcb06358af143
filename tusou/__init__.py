"""tusou (图搜): a self-hosted search-by-image service, wire-compatible with Qiniu's image search API."""

__version__ = "0.1.0"
