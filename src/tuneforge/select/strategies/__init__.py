"""One module per selection strategy; importing this package registers them all."""

from tuneforge.select.strategies import (  # noqa: F401
    dedup,
    delift,
    diversity,
    el2n,
    grape,
    ifd,
    length,
    perplexity,
    random_sample,
)
