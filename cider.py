"""CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation"), fast enough
to reward every sampled caption of every self-critical training step, in plain Python: no Java, no
subprocess.

    from cider import CiderD
    scorer = CiderD.from_references(train_references)       # document frequencies, once
    scorer.score(["a", "red", "circle"], [["a", "red", "circle"], ["a", "circle"]])   # one caption
    scorer.corpus_score(hypotheses, references)              # the mean over images
    scorer.score(words, references, closest=True)            # against the best-matched reference only

    python cider.py --data-folder data/shapes_packed         # its speed: captions scored per second

It computes what pycocoevalcap's `Cider` computes (tests/test_cider.py checks it), with two changes
that make it usable as a reward: the document frequencies are fixed (counted once, from the training
references) instead of recounted from whatever is scored, and each image's reference vectors are
computed once and cached, so scoring a caption costs only its own n-grams.

The score of a caption c against the references S of its image is 10 times the mean over n = 1..4 and
over the references s of
    sum_g min(w_c(g), w_s(g)) * w_s(g) / (|w_c| |w_s|) * exp(-(l_c - l_s)^2 / (2 sigma^2)),
with w(g) = count of the n-gram g * (log(N) - log(max(1, df(g)))), N the number of images the
document frequencies df were counted on, l a caption's number of words and sigma 6. (pycocoevalcap
counts bigrams as the length, words less one on both sides: the same difference.)

With closest=True the mean over the references s becomes the largest of their terms: the caption is
scored against the one reference it matches best. CIDEr-D's mean pays most for the phrasing most
references share; the closest reference pays every phrasing a reference uses in full, which a
self-critical reward can use so as not to push the model onto one phrasing (scst.py --reward-against).
"""

import argparse
import math
import statistics
import time
from collections import Counter
from pathlib import Path

from utils import UserError, read_json, run_main

NGRAM_ORDERS = 4
SIGMA = 6.0


def ngram_counts(words, orders=NGRAM_ORDERS):
    """Counter of every n-gram (a tuple of words) of `words` for n = 1..orders."""
    return Counter(tuple(words[i:i + n]) for n in range(1, orders + 1) for i in range(len(words) - n + 1))


def document_frequencies(references):
    """df(g): the number of images with the n-gram g in at least one of their references.

    references: list over images of lists of token lists. Returns a Counter of n-gram tuples.
    """
    df = Counter()
    for refs in references:
        df.update(set(g for ref in refs for g in ngram_counts(ref)))
    return df


class CiderD:
    """CIDEr-D with fixed document frequencies and cached reference vectors."""

    def __init__(self, document_frequency, num_documents, sigma=SIGMA):
        """document_frequency: {n-gram tuple: number of images}; num_documents: the images counted."""
        self.document_frequency = document_frequency
        self.log_num_documents = math.log(float(num_documents))
        self.sigma = sigma
        self._reference_cache = {}

    @classmethod
    def from_references(cls, references):
        """A scorer whose document frequencies are counted on `references` (list over images of lists
        of token lists), typically the training split's."""
        return cls(document_frequencies(references), len(references))

    def state_dict(self):
        """Plain types for a checkpoint: n-grams as space-joined strings (words hold no spaces)."""
        return {"document_frequency": {" ".join(g): int(n) for g, n in self.document_frequency.items()},
                "num_documents": round(math.exp(self.log_num_documents)), "sigma": self.sigma}

    @classmethod
    def from_state_dict(cls, state):
        """The scorer `state_dict` saved."""
        df = {tuple(g.split(" ")): n for g, n in state["document_frequency"].items()}
        return cls(df, state["num_documents"], state["sigma"])

    def vector(self, words):
        """The tf-idf vector of a caption: ({n-gram: weight}, [norm of each order], length)."""
        weights, squares = {}, [0.0] * NGRAM_ORDERS
        for gram, count in ngram_counts(words).items():
            idf = self.log_num_documents - math.log(max(1.0, self.document_frequency.get(gram, 0.0)))
            weights[gram] = count * idf
            squares[len(gram) - 1] += weights[gram] ** 2
        return weights, [math.sqrt(s) for s in squares], len(words)

    def reference_vectors(self, references):
        """The vectors of an image's references (a list of token lists), computed once per image."""
        key = tuple(tuple(ref) for ref in references)
        if key not in self._reference_cache:
            self._reference_cache[key] = [self.vector(ref) for ref in references]
        return self._reference_cache[key]

    def score(self, words, references, closest=False):
        """CIDEr-D of one caption (a token list) against its image's references (token lists): their
        mean, or with `closest` the one it matches best."""
        weights, norms, length = self.vector(words)
        per_reference = []
        for ref_weights, ref_norms, ref_length in self.reference_vectors(references):
            overlap = [0.0] * NGRAM_ORDERS
            for gram, weight in weights.items():
                ref_weight = ref_weights.get(gram)
                if ref_weight is not None:  # clipped: a repeated n-gram earns no more than the reference has
                    overlap[len(gram) - 1] += min(weight, ref_weight) * ref_weight
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
            per_reference.append(
                sum(o / (n * rn) if n and rn else o for o, n, rn in zip(overlap, norms, ref_norms)) * penalty)
        if closest:
            return 10.0 * max(per_reference) / NGRAM_ORDERS
        return 10.0 * sum(per_reference) / NGRAM_ORDERS / len(references)

    def scores(self, hypotheses, references, closest=False):
        """CIDEr-D of each hypothesis (token list) against its references: a list of floats."""
        return [self.score(h, refs, closest) for h, refs in zip(hypotheses, references)]

    def corpus_score(self, hypotheses, references, closest=False):
        """The mean CIDEr-D over the images, as pycocoevalcap's `Cider` reports it."""
        return sum(self.scores(hypotheses, references, closest)) / max(len(hypotheses), 1)


def split_references(data_folder, split):
    """Every reference caption (token lists) of each image of a packed split, from its metadata."""
    path = Path(data_folder) / f"{split}_meta.json"
    images = read_json(path, "the split's metadata from create_input_files.py")["images"]
    if not all("references" in m for m in images):
        raise UserError(f"{path}: was packed before the metadata kept every reference caption; pack the "
                        "data again with create_input_files.py (same images, same word map)")
    return [m["references"] for m in images]


def measure_speed(data_folder, split, runs):
    """Captions scored per second, median of `runs`: each run scores, for every image of `split`, five
    captions (the references of the next five images), with document frequencies from the train split.
    The first run fills the reference cache, as the first epoch of training does."""
    scorer, refs = CiderD.from_references(split_references(data_folder, "train")), split_references(data_folder, split)
    hypotheses = [refs[(i + j) % len(refs)][0] for i in range(len(refs)) for j in range(1, 6)]
    per_caption = [refs[i] for i in range(len(refs)) for _ in range(5)]
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        scorer.scores(hypotheses, per_caption)
        rates.append(len(hypotheses) / (time.perf_counter() - started))
    return statistics.median(rates), len(hypotheses)


def main(argv=None):
    """Print the scorer's speed on a packed data folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-folder", type=Path, required=True,
                        help="output folder of create_input_files.py, with references in its metadata")
    parser.add_argument("--split", default="test", help="the split whose images are scored (default test)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is printed (default 5)")
    args = parser.parse_args(argv)
    rate, count = measure_speed(args.data_folder, args.split, args.runs)
    print(f"CIDEr-D: {rate:,.0f} captions/s (median of {args.runs} runs of {count} captions)")
    return rate


if __name__ == "__main__":
    run_main(lambda: main(), "cider.py")
