"""Real English text without downloads, from files that ship inside the `gensim` package.

- `wiki_articles()`: 106 Wikipedia articles (title, clean text) from a shortened
  enwiki XML dump, the closest thing to WikiText available offline (~700k tokens).
- `news_articles()`: the Lee news corpus, 299 short articles (~75k tokens).
- `corpus_text`, `token_windows`, `long_document` build model inputs from them.
- `load_hf_dataset_text("wikitext2")` is for users who do have the Hugging Face hub.

gensim is imported inside the functions; parsed Wikipedia text is cached in memory and,
because parsing takes seconds, as JSON in the eccokv cache directory.
"""

from __future__ import annotations

import bz2
import functools
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from eccokv._paths import cache_dir, write_json_atomic

__all__ = [
    "CORPORA",
    "DataUnavailableError",
    "HF_DATASETS",
    "article_token_counts",
    "corpus_text",
    "load_hf_dataset_text",
    "long_document",
    "news_articles",
    "token_windows",
    "wiki_articles",
]

CORPORA = ("wiki", "news")

_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "lee_background.cor"
_CLEAN_VERSION = 1  # bump when the cleaning below changes (invalidates the JSON cache)
_PARSE_CACHE_SECONDS = 2.0  # parse slower than this -> also cache as JSON on disk


class DataUnavailableError(RuntimeError):
    """Text that needs a package or network access this machine does not have."""


def _gensim_file(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:
        raise DataUnavailableError(
            "real text comes from files inside the `gensim` package; install it with "
            "`pip install 'eccokv[hf]'` (or `make setup`)") from e
    return Path(datapath(name))


# ------------------------------------------------------------------ articles


def news_articles() -> list[str]:
    """The Lee background news corpus: one article per line, 299 articles."""
    return list(_news())


@functools.lru_cache(maxsize=1)
def _news() -> tuple[str, ...]:
    text = _gensim_file(_NEWS_FILE).read_text(encoding="utf-8", errors="replace")
    return tuple(s for s in (line.strip() for line in text.splitlines()) if s)


def wiki_articles(min_chars: int = 0) -> list[tuple[str, str]]:
    """Wikipedia articles as (title, clean text), in dump order; redirects skipped.

    `min_chars` drops articles whose clean text is shorter than that many characters.
    """
    return [(t, x) for t, x in _wiki() if len(x) >= min_chars]


def clean_wiki(markup: str) -> str:
    """Plain text from MediaWiki markup: gensim's filter_wiki, then ''' / '' and blank lines."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    text = text.replace("'''", "").replace("''", "")
    text = re.sub(r"[ \t]+\n", "\n", text)                 # trailing blanks
    text = re.sub(r"[ \t]{2,}", " ", text)                  # runs of spaces
    text = re.sub(r"(?m)^[*#:;]+$\n?", "", text)            # list items emptied by filter_wiki
    text = re.sub(r"\n{3,}", "\n\n", text)                  # at most one blank line
    text = re.sub(r"(\s*\n=+[^\n]*=+)+\s*$", "", "\n" + text)  # empty trailing headings
    return text.strip()


@functools.lru_cache(maxsize=1)
def _wiki() -> tuple[tuple[str, str], ...]:
    src = _gensim_file(_WIKI_FILE)
    try:
        import gensim
        version = gensim.__version__
    except ImportError:  # pragma: no cover - _gensim_file raised already
        version = "?"
    cached = cache_dir("text") / f"wiki-{src.stat().st_size}-g{version}-v{_CLEAN_VERSION}.json"
    try:
        rows = json.loads(cached.read_text(encoding="utf-8"))
        return tuple((str(t), str(x)) for t, x in rows)
    except (OSError, ValueError, TypeError):
        pass
    t0 = time.perf_counter()
    rows = _parse_wiki(src)
    if time.perf_counter() - t0 > _PARSE_CACHE_SECONDS:
        try:
            write_json_atomic(cached, rows)
        except OSError:  # a read-only cache is not an error: parse again next time
            pass
    return tuple(rows)


def _parse_wiki(src: Path) -> list[tuple[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages

    rows = []
    with bz2.BZ2File(src) as f:
        for title, markup, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if not markup or markup.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wiki(markup)
            if text:
                rows.append((title, text))
    return rows


def corpus_text(name: str) -> str:
    """All articles of corpus `name` ("wiki" or "news") joined with blank lines."""
    if name == "wiki":
        return "\n\n".join(text for _, text in _wiki())
    if name == "news":
        return "\n\n".join(_news())
    raise ValueError(f"unknown corpus {name!r}: expected one of {list(CORPORA)}")


# ------------------------------------------------------------------ tokens


def _tok_key(tokenizer: Any) -> tuple[str, str, int]:
    name = getattr(tokenizer, "name_or_path", None) or ""
    try:
        size = len(tokenizer)
    except TypeError:
        size = -1
    return (f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}", str(name), size)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: no "longer than the model's maximum length" warning for a whole corpus.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


_TOKENS: dict[tuple[Any, ...], torch.Tensor] = {}


def corpus_tokens(tokenizer: Any, corpus: str = "wiki") -> torch.Tensor:
    """The whole corpus tokenised once (no special tokens), cached per tokenizer and corpus."""
    key = (*_tok_key(tokenizer), corpus)
    ids = _TOKENS.get(key)
    if ids is None:
        ids = torch.tensor(_encode(tokenizer, corpus_text(corpus)), dtype=torch.long)
        _TOKENS[key] = ids
    return ids


def token_windows(tokenizer: Any, corpus: str = "wiki", window: int = 1024, n: int = 8,
                  stride: int | None = None, seed: int | None = None,
                  offset: int = 0) -> torch.Tensor:
    """`n` non-overlapping windows of `window` tokens, LongTensor [n, window].

    The corpus is tokenised once (no special tokens; cached per tokenizer and corpus) and
    the windows are cut from the token stream after its first `offset` tokens:

    - default (`stride=None, seed=None`): spread evenly, the first starting at `offset`
      and the last ending at or just before the end of the stream;
    - `stride`: window i starts at `offset + i * stride` (`stride >= window`);
    - `seed`: random but reproducible placement (same seed, same windows). With a
      `stride` it shifts the whole grid by a random amount; without one, the windows
      fall anywhere in the stream, still in order and never overlapping.

    Raises ValueError, stating how many tokens are available, if the corpus is too short.
    """
    if window < 1 or n < 1 or offset < 0:
        raise ValueError(f"need window >= 1, n >= 1, offset >= 0 (got {window}, {n}, {offset})")
    if stride is not None and stride < window:
        raise ValueError(f"stride ({stride}) < window ({window}) would make windows overlap")
    ids = corpus_tokens(tokenizer, corpus)
    avail = ids.numel() - offset
    step = stride if stride is not None else window
    need = (n - 1) * step + window
    if avail < need:
        what = f"{n} windows of {window} tokens" + (f" at stride {stride}" if stride else "")
        raise ValueError(
            f"corpus {corpus!r} is too short for {what} ({need} tokens) after offset "
            f"{offset}: {max(avail, 0)} tokens available ({ids.numel()} in total)")
    slack = avail - need
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if stride is not None:
        shift = int(torch.randint(0, slack + 1, (1,), generator=gen)) if gen is not None else 0
        starts = [offset + shift + i * stride for i in range(n)]
    elif gen is not None:
        # n sorted draws from [0, slack] spread the free tokens between the windows.
        gaps = torch.randint(0, slack + 1, (n,), generator=gen).sort().values.tolist()
        starts = [offset + g + i * window for i, g in enumerate(gaps)]
    else:
        spacing = (avail - window) // (n - 1) if n > 1 else 0  # >= window: avail >= n*window
        starts = [offset + i * spacing for i in range(n)]
    return torch.stack([ids[s : s + window] for s in starts]).clone()


_COUNTS: dict[tuple[Any, ...], tuple[int, ...]] = {}


def article_token_counts(tokenizer: Any) -> list[tuple[str, int]]:
    """(title, tokens) for every Wikipedia article, in dump order."""
    arts = _wiki()
    key = _tok_key(tokenizer)
    counts = _COUNTS.get(key)
    if counts is None:
        counts = tuple(len(_encode(tokenizer, text)) for _, text in arts)
        _COUNTS[key] = counts
    return [(title, c) for (title, _), c in zip(arts, counts, strict=True)]


def long_document(tokenizer: Any, min_tokens: int = 3000, max_tokens: int | None = None,
                  pick: str = "shortest") -> tuple[str, str]:
    """(title, text) of one real Wikipedia article with at least `min_tokens` tokens.

    The choice is deterministic. `pick="shortest"` (default): the shortest article that
    is long enough (earliest in the dump on ties), which keeps a prefill over it as cheap
    as possible (with SmolLM2's tokenizer and 3000 tokens: "Adobe", 3612 tokens);
    `pick="first"`: the first such article in dump order ("Anarchism", 15071 tokens).
    If no article is long enough, consecutive articles from the start of the dump are
    joined until they are, and the title says so. `max_tokens` cuts the text on a token
    boundary.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    if pick not in ("shortest", "first"):
        raise ValueError(f"pick must be 'shortest' or 'first', got {pick!r}")
    if max_tokens is not None and max_tokens < min_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) < min_tokens ({min_tokens})")
    arts = _wiki()
    counts = [c for _, c in article_token_counts(tokenizer)]
    fits = [i for i, c in enumerate(counts) if c >= min_tokens]
    if fits:
        i = fits[0] if pick == "first" else min(fits, key=lambda j: (counts[j], j))
        title, text = arts[i]
    else:
        titles, parts, total = [], [], 0
        for (t, x), c in zip(arts, counts, strict=True):
            titles.append(t)
            parts.append(x)
            total += c
            if total >= min_tokens:
                break
        text = "\n\n".join(parts)
        if len(_encode(tokenizer, text)) < min_tokens:
            raise ValueError(f"all {len(arts)} Wikipedia articles together have fewer than "
                             f"{min_tokens} tokens")
        title = (f"{len(titles)} consecutive articles joined (no single article has "
                 f"{min_tokens} tokens): " + " + ".join(titles))
    if max_tokens is not None:
        text = _truncate(tokenizer, text, max_tokens)
    return title, text


def _truncate(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest prefix of `text` that ends on the boundary of token `max_tokens`."""
    try:
        enc = tokenizer(text, add_special_tokens=False, verbose=False,
                        return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (KeyError, NotImplementedError, TypeError, ValueError):
        offsets = None
    if offsets is not None:
        if len(offsets) <= max_tokens:
            return text
        return text[: offsets[max_tokens - 1][1]]
    ids = _encode(tokenizer, text)
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens])


# ------------------------------------------------------------------ hub data sets

# name -> (datasets.load_dataset arguments, split, text column)
HF_DATASETS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "test", "text"),
    "wikitext103": (("wikitext", "wikitext-103-raw-v1"), "test", "text"),
}


def load_hf_dataset_text(name: str, split: str | None = None) -> str:
    """Text of a standard benchmark set from the Hugging Face hub (needs `datasets` and a hub).

    "wikitext2" gives the WikiText-2 raw test split joined the usual way ("\\n\\n").
    Raises `DataUnavailableError` when `datasets` is not installed or the hub cannot be
    reached; use `corpus_text("wiki")` for text that works offline.
    """
    if name not in HF_DATASETS:
        raise ValueError(f"unknown data set {name!r}: expected one of {sorted(HF_DATASETS)}")
    args, default_split, column = HF_DATASETS[name]
    try:
        import datasets
    except ImportError as e:
        raise DataUnavailableError(
            f"{name!r} comes from the Hugging Face hub and needs the `datasets` package "
            "(`pip install datasets`) plus network access; offline, use "
            "eccokv.data.corpus_text('wiki') instead") from e
    try:
        ds: Any = datasets.load_dataset(*args, split=split or default_split)
    except Exception as e:  # connection errors come in many types (requests, hub, OSError)
        raise DataUnavailableError(
            f"could not load {name!r} ({'/'.join(args)}) from the Hugging Face hub: {e}. "
            "Offline, use eccokv.data.corpus_text('wiki') instead") from e
    return "\n\n".join(ds[column])
