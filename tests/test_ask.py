"""trainer.ask: the same answer as trainer.generate on the same data row (forward and molcap, a tiny
export), the converters' standardisation per task, and one-line errors with exit status 2 on bad input."""
import dataclasses
import json
import os

import pytest
import torch

from conftest import DATA, cli
from trainer.ask import AskError, Assistant, Question, default_instruction, main, question_record


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    from accelerate import Accelerator

    from graph.encoder import EncoderConfig, HierarchicalEncoder
    from trainer.models.export import save_export
    from trainer.dataset.instructions import PromptConfig
    from trainer.models.llm import GRAPH_TOKEN, load_llm
    from trainer.models.multimodal_lm import MultimodalLM
    from trainer.models.projector import GraphProjector, ProjectorConfig
    from trainer.dataset.tasks import prepare

    tmp = tmp_path_factory.mktemp("ask")
    folders = {"forward": prepare("forward", os.path.join(DATA, "uspto50k", "test.csv"), str(tmp), limit=4),
               "molcap": prepare("molcap", os.path.join(DATA, "chebi20", "test.txt"), str(tmp), limit=3)}
    tok, lm = load_llm("tiny-random", attn_implementation="sdpa")
    torch.manual_seed(0)
    enc = HierarchicalEncoder(EncoderConfig(num_layers=2, hidden=32))
    gid = tok.convert_tokens_to_ids(GRAPH_TOKEN)
    pcfg = ProjectorConfig(in_dim=32, out_dim=lm.config.hidden_size, reduction="hierarchical")  # export's own layout
    model = MultimodalLM(lm, enc, GraphProjector(pcfg), gid).eval()
    meta = {"llm": "tiny-random", "attn_implementation": "sdpa", "stage": "align",
            "prompt": dataclasses.asdict(PromptConfig()), "projector": dataclasses.asdict(pcfg), "lora": None}
    export = save_export(model, tok, str(tmp / "export"), meta, Accelerator(cpu=True))
    selfies_meta = {**meta, "prompt": dataclasses.asdict(PromptConfig(use_graph=False))}
    selfies_only = save_export(MultimodalLM(lm, None, None, gid).eval(), tok, str(tmp / "selfies_export"), selfies_meta,
                               Accelerator(cpu=True))
    return export, selfies_only, folders


@pytest.fixture(scope="module")
def assistant(setup):
    return Assistant.from_pretrained(setup[0])


def test_ask_gives_generates_answer_on_the_same_row(setup, assistant):
    """Each data row asked again from its SMILES and instruction: the same SELFIES input, the same answer
    as trainer.generate.predict on the preprocessed row (one batch of several questions)."""
    from trainer.models.export import dataset_for
    from trainer.generate import predict

    for task, folder in setup[2].items():
        ds = dataset_for(assistant.meta, folder, assistant.tok)
        expected = predict(assistant.model, assistant.tok, ds, list(range(len(ds))), batch_size=4, max_new_tokens=10)
        questions = [Question(task=task, smiles=[p["metadata"]["input_smiles"]], instruction=p["instruction"])
                     for p in expected]
        got = assistant.ask_many(questions, batch_size=2, max_new_tokens=10)
        assert [g["input"] for g in got] == [p["input"] for p in expected]
        assert [g["answer"] for g in got] == [p["prediction"] for p in expected]
        if task == "forward":  # molecule answers come with their SMILES
            assert [g["smiles"] for g in got] == [p["prediction_smiles"] for p in expected]
            assert all(g["valid"] == (g["smiles"] is not None) for g in got)
        else:
            assert all("smiles" not in g for g in got)


def test_standardisation_per_task_as_the_converters():
    from graph.chem import Limits, Standardizer

    std, small = Standardizer(Limits()), Standardizer(Limits(min_heavy_atoms=1))
    # a molecule to describe is reduced to its parent: the sodium salt becomes aspirin
    rec = question_record(Question("molcap", ["CC(=O)Oc1ccccc1C(=O)[O-].[Na+]"]), std, small)
    assert rec["metadata"]["input_smiles"] == "CC(=O)Oc1ccccc1C(=O)O"
    assert rec["instruction"] == default_instruction("molcap")
    # reaction sides are never reduced: the counter-ion stays; --reaction and several --smiles agree
    a = question_record(Question("forward", ["CC(=O)[O-].[Na+]", "CCBr"]), std, small)
    b = question_record(Question("forward", reaction="CC(=O)[O-].[Na+].CCBr>>"), std, small)
    assert a["input"] == b["input"] and a["metadata"]["input_smiles"] == "CC(=O)[O-].[Na+].CCBr"
    # forward: reagents appended to the reactants; reagent: reactants>>product
    c = question_record(Question("forward", reaction="CCO.CC(=O)O>OS(=O)(=O)O>"), std, small)
    assert c["metadata"]["input_smiles"] == "CCO.CC(=O)O.O=S(=O)(O)O"
    d = question_record(Question("reagent", reaction="CCO.CC(=O)O>>CCOC(C)=O"), std, small)
    assert d["metadata"]["input_smiles"] == "CCO.CC(=O)O>>CCOC(C)=O" and ">>" in d["input"]
    # property: QM9-sized molecules are kept (no 5-atom floor), instruction names the property
    e = question_record(Question("property", ["C=O"], property="homo"), std, small)
    assert e["metadata"]["input_smiles"] == "C=O" and "HOMO energy" in e["instruction"] and "Hartree" in e["instruction"]
    with pytest.raises(AskError, match="needs the product"):
        question_record(Question("reagent", reaction="CCO>>"), std, small)
    with pytest.raises(AskError, match="one molecule"):
        question_record(Question("molcap", ["CCCCCO", "CCCCCN"]), std, small)


def test_cli_answers_with_a_json_line(setup):
    r = cli("trainer.ask", "--model", setup[0], "--task", "retrosynthesis", "--smiles", "CC(=O)Oc1ccccc1C(=O)O",
            "--max-new-tokens", "6", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["task"] == "retrosynthesis" and out["input_smiles"] == "CC(=O)Oc1ccccc1C(=O)O"
    assert isinstance(out["answer"], str) and out["valid"] == (out["smiles"] is not None)
    assert "A: " in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--smiles", "C1CC(N"], "bad molecule: unparseable"),
    (["--smiles", "C" * 1200], "too large"),  # more graph + SELFIES tokens than the export's max_length
    (["--smiles", "CCCCCCCCCCCC", "--max-heavy-atoms", "10"], "too_large: 12 heavy atoms > 10"),
    (["--smiles", "CCO"], "too_small"),  # a molecule to describe has at least 5 heavy atoms, as in training
    (["--task", "forward", "--reaction", "CCO"], "two '>'"),
    ([], "give a molecule"),
])
def test_bad_input_is_one_line_and_exit_2(setup, capsys, args, message):
    assert main(["--model", setup[0], *args, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_graph_tokens_need_a_graph_encoder(setup, capsys):
    export, selfies_only, _ = setup
    assert main(["--model", selfies_only, "--smiles", "CCCCCO", "--graph", "on"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no graph encoder" in err and len(err.splitlines()) == 1
    # the SELFIES-only export answers from the SELFIES text alone (its own setting)
    res = Assistant.from_pretrained(selfies_only).ask("CCCCCO", task="molcap", max_new_tokens=3)
    assert isinstance(res["answer"], str)
    assert main(["--model", os.path.join(os.path.dirname(export), "missing"), "--smiles", "CCCCCO"]) == 2
    assert "model not found" in capsys.readouterr().err
