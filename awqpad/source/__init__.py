"""Stage 1, source: where the files come from (a local directory, a Hub snapshot or header-only copy in the
HF cache, and the upload of a finished OUT). Hands `checkpoint` a `Source`: a local directory to read."""

from awqpad.source.hub_download import DOWNLOAD_IGNORE
from awqpad.source.resolve import resolve_source
from awqpad.source.spec import Source, parse_repo_spec, record_source

__all__ = ["DOWNLOAD_IGNORE", "Source", "parse_repo_spec", "record_source", "resolve_source"]
