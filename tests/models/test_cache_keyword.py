"""The attention cache's argument name: whichever the model's forward takes, and never both."""

from __future__ import annotations

from torch import nn

from tuneforge.models.cache_keyword import cache_keyword, clear_output_cache, get_cache, set_cache


class NewStyle(nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return cache


class OldStyle(nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return past_key_values


def test_the_keyword_follows_the_forward_signature():
    assert cache_keyword(NewStyle()) == "cache"
    assert cache_keyword(OldStyle()) == "past_key_values"


def test_set_cache_leaves_one_name_that_the_module_reads():
    sentinel = object()
    inputs = {"input_ids": 1, "past_key_values": "stale"}  # a caller using the old name
    set_cache(inputs, NewStyle(), sentinel)
    assert "past_key_values" not in inputs and NewStyle()(**inputs) is sentinel
    inputs = {"cache": "stale"}
    set_cache(inputs, OldStyle(), sentinel)
    assert "cache" not in inputs and OldStyle()(**inputs) is sentinel


def test_get_cache_reads_either_name_and_clear_drops_it():
    assert get_cache({"cache": 3}) == 3 and get_cache({"past_key_values": 4}) == 4 and get_cache({}) is None

    class Output:
        cache = "kv"

    output = Output()
    clear_output_cache(output)
    assert output.cache is None
