"""Session tags (ktls-utils 1.4.0's tls-session-tags(7)): names a session gets from its peer's
certificate, sent to the kernel in DONE. See :mod:`tlshd.tags.rules`."""

from tlshd.config import TAGS_DIR
from tlshd.tags.rules import MAX_DONE_TAGS, TagSet, load_tags, parse_tag_texts

__all__ = ["MAX_DONE_TAGS", "TAGS_DIR", "TagSet", "load_tags", "parse_tag_texts"]
