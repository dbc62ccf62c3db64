"""Text <-> token ids for generation from the command line and pipeline files: `bytes` (one
token per byte, as the zoo's `char_lm` reads text) or a local Hugging Face tokenizer directory.
Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from optim.errors import ConfigError


class ByteTokenizer:
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise ConfigError(f"tokenizer {path!r} is neither 'bytes' nor a local directory")
        self.name = str(path)
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"tokenizer {path!r}: transformers cannot load it: "
                              f"{type(e).__name__}: {str(e).strip()[:200]}") from e

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        """The tokenizer's data files (vocabulary, merges, configuration) into `directory`."""
        self.tok.save_pretrained(str(directory))


def load_tokenizer(spec: str | None):
    """`bytes`, a local tokenizer directory, or None (an error naming the fix)."""
    if not spec:
        raise ConfigError("this model names no tokenizer; pass --tokenizer bytes or a local "
                          "Hugging Face tokenizer directory, or --ids with token ids")
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)
