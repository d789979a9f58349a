"""Multi-reference NLG metrics, all offline.

* BLEU: sacrebleu's corpus BLEU (13a tokenisation, closest reference length), in percent; inputs
  with fewer references get ``None`` in the missing reference streams, which sacrebleu skips.
  The official E2E script (e2e-metrics) uses mteval-v13a BLEU with the same statistics.
* TER: sacrebleu's TER, as a fraction (the DSEE tables print 0.46, not 46).
* NIST: NLTK's ``corpus_nist`` (n = 5), the mteval definition.
* METEOR: NLTK's ``meteor_score`` with exact and Porter-stem matching only: WordNet synonyms are
  not available offline, and the official METEOR 1.5 also matches paraphrases, so ours reads lower.
* ROUGE-L and CIDEr (E2E): ours, following pycocoevalcap as the E2E script does (ROUGE-L F with
  β = 1.2, the best reference per input; CIDEr-D with σ = 6, clipping, ×10, document frequencies
  from the references of the evaluated set).
Scores are for lowercased text tokenised as mteval-v13a does (E2E and GEM evaluate lowercased too).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def _norm(text: str) -> str:
    """Lowercased and tokenised as mteval-v13a does (punctuation split off), for every metric."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return " ".join(Tokenizer13a()(text.lower()).split())


def _streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    width = max(len(r) for r in refs)
    return [[_norm(r[k]) if k < len(r) else None for r in refs] for k in range(width)]


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    from sacrebleu.metrics import BLEU

    return float(BLEU().corpus_score([_norm(h) for h in hyps], _streams(refs)).score)


def ter(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    from sacrebleu.metrics import TER

    return float(TER().corpus_score([_norm(h) for h in hyps], _streams(refs)).score) / 100.0


def nist(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 5) -> float:
    from nltk.translate.nist_score import corpus_nist

    hyp_tokens = [_norm(h).split() for h in hyps]
    if not any(hyp_tokens):
        return 0.0
    try:
        return float(corpus_nist([[_norm(r).split() for r in rs] for rs in refs], hyp_tokens, n=n))
    except ZeroDivisionError:  # no n-gram of the hypotheses occurs in the references
        return 0.0


class _NoWordNet:
    """METEOR's synonym stage, with no WordNet data offline: no synonyms."""

    @staticmethod
    def synsets(*args, **kwargs):
        return []


def meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([_norm(r).split() for r in rs], _norm(h).split(), wordnet=_NoWordNet())
              for h, rs in zip(hyps, refs)]
    return float(sum(scores) / max(1, len(scores)))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """pycocoevalcap's ROUGE-L: per input, max precision and max recall of the LCS over the
    references, combined into F_β; averaged over inputs."""
    scores = []
    for h, rs in zip(hyps, refs):
        ht = _norm(h).split()
        precisions, recalls = [], []
        for r in rs:
            rt = _norm(r).split()
            lcs = _lcs(ht, rt)
            precisions.append(lcs / len(ht) if ht else 0.0)
            recalls.append(lcs / len(rt) if rt else 0.0)
        p, r = max(precisions), max(recalls)
        scores.append(((1 + beta**2) * p * r) / (r + beta**2 * p) if p and r else 0.0)
    return float(sum(scores) / max(1, len(scores)))


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def cider(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (pycocoevalcap): TF-IDF n-gram cosine with a length penalty and clipping, ×10."""
    ref_tokens = [[_norm(r).split() for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in ref_tokens:
        df.update({g for r in rs for k in range(1, n + 1) for g in _ngrams(r, k)})
    log_docs = math.log(float(max(1, len(refs))))

    def vec(tokens: list[str]):
        out = []
        for k in range(1, n + 1):
            counts = _ngrams(tokens, k)
            weights = {g: c * (log_docs - math.log(max(1.0, df[g]))) for g, c in counts.items()}
            norm = math.sqrt(sum(w * w for w in weights.values()))
            out.append((weights, norm))
        return out, len(tokens)

    total = 0.0
    for h, rs in zip(hyps, ref_tokens):
        hv, hl = vec(_norm(h).split())
        score = [0.0] * n
        for r in rs:
            rv, rl = vec(r)
            for k in range(n):
                (hw, hn), (rw, rn) = hv[k], rv[k]
                dot = sum(min(w, rw[g]) * rw[g] for g, w in hw.items() if g in rw)
                if hn and rn:
                    score[k] += dot / (hn * rn) * math.exp(-((hl - rl) ** 2) / (2 * sigma**2))
        total += sum(s / len(rs) for s in score) / n * 10.0
    return float(total / max(1, len(hyps)))


METRICS = {"bleu": bleu, "nist": nist, "meteor": meteor, "ter": ter,
           "rouge_l": rouge_l, "cider": cider}


def nlg_metrics(hyps: Sequence[str], refs: Sequence[Sequence[str]], names: Sequence[str]) -> dict[str, float]:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} inputs")
    return {name: round(METRICS[name](hyps, refs), 4) for name in names}
