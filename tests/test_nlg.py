"""Generation tasks: readers, the target-only loss, deterministic batched beam search, and the
NLG metrics on small cases checked by hand."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dsee_cli.core.models import TinySize, load_model
from dsee_cli.data.generation import (
    DecodeConfig,
    collate_lm,
    decode,
    encode_eval,
    encode_lm,
    group,
    lm_loss,
    read_pairs,
    synthetic_pairs,
)
from dsee_cli.data.nlg_metrics import bleu, cider, meteor, nist, nlg_metrics, rouge_l, ter
from dsee_cli.errors import DSEEError
from dsee_cli.measure.accounting import trainable_counts
from dsee_cli.tuning.adapters import LowRankConfig, inject_adapters

REFS = [["the vaults is a pub near cafe adriatic .", "near cafe adriatic there is a pub called the vaults ."],
        ["green man serves cheap food ."]]


def test_a_perfect_hypothesis_scores_bleu_100_and_ter_0():
    hyps = [REFS[0][1], REFS[1][0]]
    scores = nlg_metrics(hyps, REFS, ["bleu", "ter", "rouge_l", "meteor"])
    assert scores["bleu"] == 100.0 and scores["ter"] == 0.0 and scores["rouge_l"] == 1.0
    assert scores["meteor"] > 0.99
    assert nist(hyps, REFS) > nist(["a pub", "food"], REFS)
    assert cider(hyps, REFS) > cider(["a pub", "food"], REFS)


def test_multiple_references_beat_a_single_one_where_they_should():
    hyps = ["near cafe adriatic there is a pub called the vaults .", "green man serves cheap food ."]
    single = [[REFS[0][0]], REFS[1]]
    assert bleu(hyps, REFS) > bleu(hyps, single)  # the hypothesis is the second reference
    assert ter(hyps, REFS) < ter(hyps, single)
    assert rouge_l(hyps, REFS) > rouge_l(hyps, single)
    assert meteor(hyps, REFS) > meteor(hyps, single)


def test_bleu_by_hand():
    # hypothesis "a b c d" against "a b c e": p1 = 3/4, p2 = 2/3, p3 = 1/2 and no 4-gram match, which
    # mteval-v13a's smoothing (sacrebleu's default "exp") counts as 1/2: BLEU = (3/4 · 2/3 · 1/2 · 1/2)^(1/4)
    assert bleu(["a b c d"], [["a b c e"]]) == pytest.approx(100 * 0.125**0.25, abs=1e-3)
    # against "a b c d e": all precisions 1, brevity penalty e^(1 - 5/4)
    assert bleu(["a b c d"], [["a b c d e"]]) == pytest.approx(100 * 2.718281828 ** (1 - 5 / 4), abs=1e-3)


def test_readers_group_all_references_of_an_input(tmp_path):
    csv_file = tmp_path / "devset.csv"
    csv_file.write_text('mr,ref\n"name[The Vaults], eatType[pub]","The Vaults is a pub."\n'
                        '"name[The Vaults], eatType[pub]","A pub: The Vaults."\n"name[Bibimbap]","Bibimbap."\n')
    txt = tmp_path / "test.txt"
    txt.write_text("name : The Vaults | Type : pub || The Vaults is a pub .\n"
                   "name : The Vaults | Type : pub || A pub .\nname : X || X .\n")
    jsonl = tmp_path / "valid.jsonl"
    jsonl.write_text('{"source": "a | b", "references": ["r1", "r2"]}\n{"input": "c", "target": "r3"}\n')
    for path, first in ((csv_file, "name[The Vaults], eatType[pub]"), (txt, "name : The Vaults | Type : pub"),
                        (jsonl, "a | b")):
        grouped = group(read_pairs(path))
        assert len(grouped) == 2 and grouped[0].source == first and len(grouped[0].references) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("no separator here\n")
    with pytest.raises(DSEEError, match="has no '\\|\\|'"):
        read_pairs(bad)


def _tiny_lm():
    lm = load_model("tiny-gpt2", None, 1, 0, TinySize(32, 2, 4, 64), causal_lm=True)
    return lm.model, lm.tokenizer, lm.tokenizer.sep_token_id


def test_the_loss_covers_the_target_only():
    model, tok, eos = _tiny_lm()
    enc = encode_lm(synthetic_pairs(3, seed=0), tok, 64, eos)
    batch = collate_lm(enc, [0, 1, 2], tok.pad_token_id)
    for row, prompt in enumerate(enc.prompts[:3]):
        assert (batch["labels"][row, : len(prompt)] == -100).all()  # the prompt is not a target
        assert (batch["labels"][row, len(prompt) : len(enc.input_ids[row])] != -100).all()

    class Fixed(torch.nn.Module):  # the real model's hidden states, as a leaf we can take gradients of
        def __init__(self):
            super().__init__()
            self.hidden = torch.nn.Parameter(model.base_model(input_ids=batch["input_ids"]).last_hidden_state.detach())
            self.head = model.get_output_embeddings()

        def get_decoder(self):
            return lambda **kwargs: type("Out", (), {"last_hidden_state": self.hidden})

        def get_output_embeddings(self):
            return self.head

    fixed = Fixed()
    lm_loss(fixed, batch).backward()
    grad = fixed.hidden.grad.abs().sum(-1)
    for row, prompt in enumerate(enc.prompts[:3]):
        # position t predicts token t+1: the prompt's tokens (but its last) get no gradient
        assert (grad[row, : len(prompt) - 1] == 0).all()
        assert (grad[row, len(prompt) - 1 : len(enc.input_ids[row]) - 1] > 0).all()
    # the masking matters: un-masking the prompt's labels changes the loss
    with_prompt = batch["labels"].clone()
    with_prompt[0, 0 : len(enc.prompts[0])] = batch["input_ids"][0, 0 : len(enc.prompts[0])]
    assert lm_loss(model, {**batch, "labels": with_prompt}).item() != pytest.approx(lm_loss(model, batch).item())


def test_batched_beam_search_is_deterministic_and_padding_free():
    model, tok, eos = _tiny_lm()
    torch.manual_seed(0)
    examples = group(synthetic_pairs(5, seed=3))
    enc = encode_eval(examples, tok, 64, eos)
    settings = DecodeConfig(num_beams=3, max_new_tokens=8, batch_size=5)
    first = decode(model, tok, enc.prompts, settings, torch.device("cpu"), eos, tok.pad_token_id)
    again = decode(model, tok, enc.prompts, settings, torch.device("cpu"), eos, tok.pad_token_id)
    one_by_one = decode(model, tok, enc.prompts, DecodeConfig(num_beams=3, max_new_tokens=8, batch_size=1),
                        torch.device("cpu"), eos, tok.pad_token_id)
    assert first == again == one_by_one and len(first) == 5 and any(first)


@pytest.mark.parametrize("rank,expected", [(4, 393_216), (2, 196_608)])
def test_gpt2_medium_lm_counts(rank, expected):
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    inject_adapters(model, LowRankConfig(rank=rank, alpha=2 * rank, omega_size=0))
    counts = trainable_counts(model)
    assert counts.adapter_low_rank == expected and counts.task_head == 0 and counts.other == 0  # 0.39M / 0.20M


def test_generation_selects_on_validation_and_reports_the_test_split_once(tmp_path):
    """The best weights are chosen on the validation split's token accuracy; the test split is
    decoded once, at the end, with those weights; a run that would select on what it reports is
    refused before any work."""
    from dsee_cli.config import validate

    from .helpers import GPT2_E2E, compose, run_in_process

    metrics = run_in_process(tmp_path / "run", *GPT2_E2E, "trainer.keep_best=true", "pruning=none", messages=[])
    assert metrics["main_metric"] == "validation/token_accuracy"
    assert {k.split("/")[0] for k in metrics["final"]["eval"]} == {"validation"}
    assert metrics["final"]["generation"] and {k.split("/")[0] for k in metrics["final"]["generation"]} == {"test"}
    assert (tmp_path / "run" / "generations-test.jsonl").is_file()
    with pytest.raises(DSEEError, match="task.select_split and task.eval_split are both 'test'"):
        validate(compose(*GPT2_E2E, "task.select_split=test"))


def test_local_generation_files_give_each_split_its_own_file(tmp_path):
    from dsee_cli.data.classification import DataSource
    from dsee_cli.data.generation import load_nlg

    for split, mr in (("train", "name : a"), ("valid", "name : b"), ("test", "name : c")):
        (tmp_path / f"{split}.txt").write_text(f"{mr} || the {split} reference\n")
    data = load_nlg(DataSource(name="e2e", data_dir=str(tmp_path), eval_split="test", select_split="validation"), 1)
    assert [e.source for e in data.evals["validation"]] == ["name : b"]
    assert [e.source for e in data.evals["test"]] == ["name : c"]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_chunked_loss_equals_cross_entropy_over_full_logits(smoothing):
    """The LM head on target positions only, 5 at a time, recomputed in backward: the same loss
    and the same gradients as fp32 logits over every position."""
    model, tok, eos = _tiny_lm()
    enc = encode_lm(synthetic_pairs(4, seed=1), tok, 64, eos)
    batch = collate_lm(enc, [0, 1, 2, 3], tok.pad_token_id)
    model.train(False)
    chunked = lm_loss(model, batch, smoothing, chunk=5)
    grads = torch.autograd.grad(chunked, [p for p in model.parameters() if p.requires_grad])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                             label_smoothing=smoothing)
    reference = torch.autograd.grad(full, [p for p in model.parameters() if p.requires_grad])
    assert torch.allclose(chunked, full, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, reference))
