"""The data pipeline for supervised finetuning: sources -> examples -> tokens -> batches.

    result = load_examples("train.jsonl")                     # or a folder, or "arithmetic"
    tokenized = tokenize_examples(result.examples, tokenizer, template="auto", max_seq_len=1024)
    plan = BatchPlan(tokenized, batch_size=8, packing=True, max_seq_len=1024, seed=0)
    for batch in plan.batches(epoch=0):                      # dicts of tensors for model(**batch)
        ...
"""

from tuneforge.data.batching import BatchPlan, EpochBatches, build_batches
from tuneforge.data.collate import block_causal_mask, collate_packed, collate_padded
from tuneforge.data.datasets import corpus_languages, get_dataset, list_datasets, register_dataset
from tuneforge.data.formats import FORMATS, detect_format
from tuneforge.data.loading import LoadResult, load_examples
from tuneforge.data.packing import pack_examples, padding_fraction
from tuneforge.data.records import Example, Message, Origin
from tuneforge.data.templates import BUILTIN_TEMPLATES, TEMPLATE_NAMES, render_conversation, render_prompt, resolve_template, template_writes_bos
from tuneforge.data.tokenization import IGNORE_INDEX, TokenizedExample, encode_prompt, tokenize_examples

__all__ = [
    "BUILTIN_TEMPLATES",
    "FORMATS",
    "IGNORE_INDEX",
    "TEMPLATE_NAMES",
    "BatchPlan",
    "EpochBatches",
    "Example",
    "LoadResult",
    "Message",
    "Origin",
    "TokenizedExample",
    "block_causal_mask",
    "build_batches",
    "collate_packed",
    "collate_padded",
    "corpus_languages",
    "detect_format",
    "encode_prompt",
    "get_dataset",
    "list_datasets",
    "load_examples",
    "pack_examples",
    "padding_fraction",
    "register_dataset",
    "render_conversation",
    "render_prompt",
    "resolve_template",
    "template_writes_bos",
    "tokenize_examples",
]
