"""``chameleon eval lm-harness``: the lm_eval adapter against hand computations and the generation
engine, and tiny local tasks end to end (no network)."""

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import shapes_codec, tiny_model

from chameleon_lm.checkpoints import load_model, save_model
from chameleon_lm.generation.engine import generate_text
from chameleon_lm.generation.sampling import GenerationConfig, TextSampling

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance

from chameleon_lm.eval.tasks.lm_harness import ChameleonLM, add_cli, cut_at, run_lm_harness

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"question": "What turns blue?", "choices": ["a red circle", "the left"], "label": 0,
     "prompt": "a red circle turns", "answer": "blue", "text": "a red circle turns blue"},
    {"question": "Where does it move?", "choices": ["a red circle", "to the left"], "label": 1,
     "prompt": "it moves to the", "answer": "left", "text": "and moves to the left"},
    {"question": "Describe the picture:", "choices": ["a red circle", "blue"], "label": 0,
     "prompt": "Describe the picture:", "answer": "a red circle", "text": "Describe the picture:"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    codec = shapes_codec()
    folder = tmp_path_factory.mktemp("lm_harness")
    save_model(folder / "model", tiny_model(codec), codec.text)
    loaded = load_model(folder / "model")
    return loaded, folder


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def masked_logp(loaded, ids):
    """Log-softmax over the non-image ids of the logits after each of ``ids``."""
    v = loaded.text_tokenizer.vocab
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids]))[0].double()
    logits[:, v.image_start : v.image_end] = -math.inf
    return logits.log_softmax(-1)


def test_loglikelihood_is_the_text_only_log_softmax_of_the_continuation(setup):
    loaded, _ = setup
    lm = ChameleonLM(loaded, batch_size=2)
    tok, bos = loaded.text_tokenizer, loaded.text_tokenizer.vocab.bos_id
    pairs = [("a red circle", " turns blue"), ("Describe the picture: ", "a red circle"),
             ("", "a red circle"), ("a red", " circle turns blue and moves to the left")]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        stripped = ctx.rstrip()  # trailing spaces belong to the continuation
        ctx_ids = [bos] + tok.encode(stripped) if ctx else [bos]
        cont_ids = ([bos] + tok.encode(stripped + ctx[len(stripped):] + cont))[len(ctx_ids):] \
            if ctx else tok.encode(cont)
        logp = masked_logp(loaded, ctx_ids + cont_ids)[len(ctx_ids) - 1 : -1]
        assert score == pytest.approx(float(logp.gather(1, torch.tensor(cont_ids)[:, None]).sum()),
                                      rel=1e-5)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont_ids)).all())
    # is_greedy: the argmax over the non-image ids, image ids never
    ctx = [bos] + tok.encode("a red circle")
    logp = masked_logp(loaded, ctx)[-1]
    best = int(logp.argmax())
    assert lm.score_tokens([(ctx, [best])])[0] == (pytest.approx(float(logp[best]), rel=1e-5), True)
    other = int(logp.topk(2).indices[1])
    assert lm.score_tokens([(ctx, [other])])[0][1] is False
    assert lm.score_tokens([(ctx, [])]) == [(0.0, True)]
    with torch.no_grad():  # the image columns carry probability the adapter leaves out
        unmasked = loaded.model(torch.tensor([ctx]))[0, -1].double().log_softmax(-1)[best]
    assert float(unmasked) < float(logp[best]) - 1e-3


def test_loglikelihood_rolling_sums_every_token_once(setup):
    loaded, _ = setup
    tok, bos = loaded.text_tokenizer, loaded.text_tokenizer.vocab.bos_id
    text = "a red circle turns blue and moves to the left. Describe the picture: a red circle"
    ids = tok.encode(text)
    logp = masked_logp(loaded, [bos] + ids[:-1])
    whole = float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
    lm = ChameleonLM(loaded, batch_size=3)
    assert lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])[0] == pytest.approx(
        whole, rel=1e-5)
    # windows of T: token i >= T is predicted from the tokens since the window's start
    T = 8
    assert len(ids) > 2 * T
    short = ChameleonLM(loaded, batch_size=3, max_length=T)
    expect = 0.0
    for i in range(len(ids)):
        if i < T:
            inp = [bos] + ids[:i]
        else:
            end = min(T + ((i - T) // T + 1) * T, len(ids))
            inp = ids[end - T - 1 : i]
        expect += float(masked_logp(loaded, inp)[-1, ids[i]])
    got = short.loglikelihood_rolling([req("loglikelihood_rolling", text),
                                       req("loglikelihood_rolling", "")])
    assert got[0] == pytest.approx(expect, rel=1e-5) and got[1] == 0.0


def test_generate_until_is_the_engines_greedy_text_cut_at_the_stop_string(setup):
    loaded, _ = setup
    tok, v = loaded.text_tokenizer, loaded.text_tokenizer.vocab
    prompts = ["a red circle", "Describe the picture:"]
    config = GenerationConfig(max_new_tokens=12, text=TextSampling(greedy=True, repetition_penalty=1.0))
    refs = generate_text(loaded.model, v, [[v.bos_id] + tok.encode(p) for p in prompts], config)
    texts = [tok.decode([t for t in r if t != v.eos_id]) for r in refs]
    assert all(len(t) >= 4 for t in texts), texts
    lm = ChameleonLM(loaded, batch_size=2)
    never = {"until": ["\u2603"], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([req("generate_until", p, never) for p in prompts])
    assert got == texts
    stop = texts[0][2:4]
    cut = lm.generate_until([req("generate_until", prompts[0],
                                 {"until": [stop], "max_gen_toks": 12, "temperature": 0.0})])
    assert cut == [texts[0].split(stop)[0]] and len(cut[0]) < len(texts[0])
    assert cut_at("abc.def\nx", ["\n", "."]) == "abc"
    sampled = {"until": [], "max_gen_toks": 6, "do_sample": True, "temperature": 1.0}
    a = lm.generate_until([req("generate_until", prompts[0], sampled)])
    assert a == lm.generate_until([req("generate_until", prompts[0], sampled)])  # seeded
    with pytest.raises(ValueError, match="no room"):
        lm.generate_until([req("generate_until", "a", {"max_gen_toks": 10_000})])


def write_tasks(folder):
    """Three tiny local tasks (multiple choice, generation, rolling) with absolute data paths."""
    folder.mkdir()
    for split, docs in (("train", DOCS[:2]), ("test", DOCS)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    data = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {folder / 'train.jsonl'}\n"
            f"    test: {folder / 'test.jsonl'}\n  cache_dir: {folder / 'hf_cache'}\n"
            "training_split: train\ntest_split: test\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + data + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    (folder / "tiny_roll.yaml").write_text(
        "task: tiny_roll\n" + data + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
    return folder


def test_simple_evaluate_on_local_tasks_and_the_cli(setup, tmp_path):
    _, folder = setup
    tasks = write_tasks(tmp_path / "tasks")
    res = run_lm_harness(folder / "model", ["tiny_mc", "tiny_gen", "tiny_roll"], tmp_path / "out",
                         num_fewshot=1, include_path=tasks, offline=True, batch_size=4,
                         bootstrap_iters=0)
    r = res["results"]
    assert 0.0 <= r["tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= r["tiny_gen"]["exact_match,none"] <= 1.0
    assert 1 < r["tiny_roll"]["word_perplexity,none"] < math.inf
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["results"]["tiny_mc"]["acc,none"] == r["tiny_mc"]["acc,none"]
    assert written["n-shot"]["tiny_mc"] == 1 and written["config"]["random_seed"] == 0
    made = lm_eval.api.registry.get_model("chameleon").create_from_arg_string(
        f"pretrained={folder / 'model'},batch_size=2", {"device": "cpu", "batch_size": None})
    assert isinstance(made, ChameleonLM) and made.batch_size == 2
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="eval_command"))
    args = parser.parse_args(["lm-harness", "--model", str(folder / "model"), "--tasks", "tiny_mc",
                              "--include-path", str(tasks), "--limit", "2", "--num-fewshot", "0",
                              "--offline", "--log-samples", "--out", str(tmp_path / "cli")])
    assert args.func(args) == 0
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert 0.0 <= cli["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert cli["n-samples"]["tiny_mc"]["effective"] == 2
    assert len((tmp_path / "cli" / "samples_tiny_mc.jsonl").read_text().splitlines()) == 2


def test_the_module_imports_without_lm_eval():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import chameleon_lm.eval.tasks.lm_harness as m\n"
            "try:\n    m.ChameleonLM\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'chameleon-lm[eval]'" in out.stdout
