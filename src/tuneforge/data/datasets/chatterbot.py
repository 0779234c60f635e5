"""`chatterbot`: short multi-turn dialogues from the `chatterbot-corpus` package, by language.

Each YAML file of the corpus holds `conversations:`, a list of lists of lines that alternate
speakers, the first line being the user's. A conversation becomes user/assistant messages; a
trailing user line with no reply is dropped (there is nothing to train on after it).
"""

from __future__ import annotations

import importlib.util
import logging
import random
from pathlib import Path

import yaml

from tuneforge.data.datasets.splits import split_of
from tuneforge.data.records import Example, Origin, chat_example
from tuneforge.errors import ConfigError, DataError, MissingPackageError

logger = logging.getLogger(__name__)

# The corpus has answers such as "yes" or "22"; YAML 1.1 would turn them into True or 22. The
# base loader keeps every scalar as the string written in the file.
_STRING_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


def corpus_languages() -> list[str]:
    return sorted(folder.name for folder in _corpus_root().iterdir() if folder.is_dir() and any(folder.glob("*.yml")))


def build_chatterbot(split: str, language: str = "english", size: int | None = None, seed: int = 0) -> list[Example]:
    folder = _corpus_root() / language
    if not folder.is_dir():
        raise ConfigError(f"Dataset 'chatterbot' has no language {language!r}; available: {', '.join(corpus_languages())}")
    examples = [example for example in _read_language(folder) if split_of(_conversation_key(example)) == split]
    if size is not None:
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"Dataset 'chatterbot': size={size!r} must be a positive integer")
        # A seeded sample, returned in corpus order so the subset reads like the files.
        chosen = sorted(random.Random(f"chatterbot:{language}:{split}:{seed}").sample(range(len(examples)), min(size, len(examples))))
        examples = [examples[index] for index in chosen]
    return examples


def _corpus_root() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError("chatterbot-corpus", "The bundled dataset 'chatterbot'", pip_args="--no-deps chatterbot-corpus")
    return Path(spec.submodule_search_locations[0]) / "data"


def _read_language(folder: Path) -> list[Example]:
    examples, seen, malformed = [], set(), 0
    for file in sorted(folder.glob("*.yml")):
        try:
            document = yaml.load(file.read_text(encoding="utf-8"), Loader=_STRING_LOADER)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise DataError(f"{file}: cannot read this chatterbot-corpus file ({error}); reinstall the package.") from None
        conversations = document.get("conversations", []) if isinstance(document, dict) else []
        for number, lines in enumerate(conversations, start=1):
            # A few corpus entries are "question - answer" strings instead of lists: unusable.
            if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines) or len(lines) < 2:
                malformed += 1
                continue
            lines = lines[: len(lines) // 2 * 2]
            turns = [("user" if index % 2 == 0 else "assistant", line.strip()) for index, line in enumerate(lines)]
            if tuple(turns) in seen or not all(content for _, content in turns):
                continue
            seen.add(tuple(turns))
            examples.append(chat_example(turns, Origin(str(file), number, unit="conversation")))
    if malformed:
        logger.debug("chatterbot %s: left out %d malformed conversations", folder.name, malformed)
    return examples


def _conversation_key(example: Example) -> str:
    return "\n".join(f"{message.role}: {message.content}" for message in example.messages)
