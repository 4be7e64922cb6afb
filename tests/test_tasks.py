"""Standard evals (app/indexing/tasks.py, `spotlm eval --tasks=...`): the shared HellaSwag and LAMBADA files
parse into lm_eval's documents, the batched scoring equals a plain one-request-per-forward reference at any
batch size, and lm-evaluation-harness itself, run offline on the same export with local task files, gives the
same per-request log-likelihoods and the same acc / acc_norm / perplexity."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.indexing.evaluate import EvalConfig, evaluate_tasks, load_model
from app.indexing.tasks import (Request, encode_pair, hellaswag_doc, hellaswag_preprocess, lambada_doc,
                                loglikelihoods, read_hellaswag, read_lambada, split_ctx)
from app.data.tokenizer import load_tokenizer
from app.model.export import export_model
from app.model.gpt import GPT, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "assets" / "lm_eval_tasks"
N = 24  # items of each task scored in the tests
WINDOW = 64  # the tiny model's context: most LAMBADA items are truncated from the left
# A request's log-likelihood is a float32 sum over its tokens; other batch shapes take other CPU kernels, whose
# reduction order moves such sums by a few 1e-4 on some CPUs (a wrong token or truncation moves them by > 1).
LOGPROB_ATOL = 1e-3


def _paths(shared: Path) -> tuple[str, str, str]:
    return (str(shared / "hellaswag_val_full.txt.bz2"), str(shared / "lambada_test.jsonl"),
            str(shared / "gpt2_tokenizer" / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny(shared_data, tmp_path_factory):
    """A tiny GPT on the GPT-2 vocabulary (a Llama export transformers loads) fitted to the answers (HellaSwag's gold
    ending, LAMBADA's last word) of the first half of the items, so that acc counts are neither 0 nor all."""
    hs_path, lb_path, tok_path = _paths(shared_data)
    tok = load_tokenizer(tok_path)
    pairs = [encode_pair(tok, q, " " + c[g]) for q, c, g in map(hellaswag_doc, read_hellaswag(hs_path, N // 2))]
    pairs += [encode_pair(tok, *lambada_doc(t)) for t in read_lambada(lb_path, N // 2)]
    rows = [(r.context + r.continuation)[-(WINDOW + 1):] for r in pairs]
    x = torch.zeros(len(rows), WINDOW, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r) - 1] = torch.tensor(r[:-1])
    # only the answers' positions go through the 50k-row head: the cost of a step is theirs
    where = [(i, len(r) - 1 - k) for i, (r, p) in enumerate(zip(rows, pairs))
             for k in range(1, len(p.continuation) + 1)]
    rows_i, cols = torch.tensor(where).T
    targets = torch.tensor([rows[i][c + 1] for i, c in where])
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.get_vocab_size(), max_seq_len=WINDOW))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead on a busy 2-core machine
    for _ in range(30):
        h = model.model.norm(model.trunk(x))[rows_i, cols]
        loss = torch.nn.functional.cross_entropy(model.lm_head(h), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    export = str(tmp_path_factory.mktemp("tasks") / "export")
    export_model(model.eval(), export, tok_path)
    return {"export": export, "hellaswag": hs_path, "lambada": lb_path, "tok": tok}


def test_files_parse_into_lm_evals_documents(shared_data):
    hs_path, lb_path, _ = _paths(shared_data)
    docs = read_hellaswag(hs_path)
    assert len(docs) == 10042 and {d["label"] for d in docs} == {"0", "1", "2", "3"}
    assert all(len(d["endings"]) == 4 for d in docs)
    first = docs[0]  # the Hugging Face dataset's first validation item
    assert first == {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                     "endings": first["endings"], "label": "3"}
    query, choices, gold = hellaswag_doc(first)
    assert query == "Roof shingle removal: A man is sitting on a roof. He" and gold == 3
    assert choices[3] == "starts pulling up roofing on a roof."
    # WikiHow items end mid-sentence with a capital or at a full stop: no ctx_b to capitalise
    assert split_ctx("How to entertain a toddler. Choose small") == ("How to entertain a toddler. Choose small", "")
    assert split_ctx("A lady walks. She bends down. the lady") == ("A lady walks. She bends down.", "the lady")
    assert hellaswag_preprocess(" Visit [www.x.org] now [title] Go  on ") == "Visit now. Go on"
    assert len(read_hellaswag(hs_path, 5)) == 5

    texts = read_lambada(lb_path)
    assert len(texts) == 5153 and len(read_lambada(lb_path, 7)) == 7
    ctx, target = lambada_doc(texts[0])
    assert target == " signs" and texts[0] == ctx + target and not ctx.endswith(" ")


def test_bad_files_are_one_clear_error(tmp_path):
    bad = tmp_path / "hs.txt"
    bad.write_text("no colon here\n3\na\nb\nc\nd\n")
    with pytest.raises(ValueError, match="line 1: not a HellaSwag item"):
        read_hellaswag(str(bad))
    bad.write_text("A: b\n3\na\nb\nc\n")
    with pytest.raises(ValueError, match="not a multiple of 6"):
        read_hellaswag(str(bad))
    bad.write_text('{"text": "a b"}\n[1]\n')
    with pytest.raises(ValueError, match='line 2: not a JSON object with a "text"'):
        read_lambada(str(bad))


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding(tiny):
    tok = tiny["tok"]
    r = encode_pair(tok, "He said hello ", "world")
    assert r.context == tok.encode("He said hello").ids
    assert r.context + r.continuation == tok.encode("He said hello world").ids


def _reference(model: GPT, requests: list[Request]) -> list[tuple[float, bool]]:
    """One request per forward, no padding: the straightforward definition."""
    out = []
    with torch.no_grad():
        for r in requests:
            seq = (r.context + r.continuation)[-(WINDOW + 1):]
            logits, _ = model(torch.tensor([seq[:-1]]))
            logp = torch.log_softmax(logits[0].float(), -1)[-len(r.continuation):]
            cont = torch.tensor(r.continuation)
            out.append((logp.gather(1, cont[:, None]).sum().item(), bool((logp.argmax(-1) == cont).all())))
    return out


def _requests(tiny) -> list[Request]:
    tok = tiny["tok"]
    reqs = [encode_pair(tok, q, " " + c) for q, cs, _ in map(hellaswag_doc, read_hellaswag(tiny["hellaswag"], 4))
            for c in cs]
    return reqs + [encode_pair(tok, *lambada_doc(t)) for t in read_lambada(tiny["lambada"], N // 2 + 4)]


def test_batched_scoring_equals_the_reference_at_any_batch_size(tiny):
    model = load_model(tiny["export"]).model
    reqs = _requests(tiny)
    assert max(len(r.context) + len(r.continuation) for r in reqs) > WINDOW + 1  # truncation is exercised
    ref = _reference(model, reqs)
    assert any(g for _, g in ref) and not all(g for _, g in ref)
    for batch in (3, 64):
        got = loglikelihoods(model, reqs, batch, "cpu")
        assert [g for _, g in got] == [g for _, g in ref]
        assert np.allclose([lp for lp, _ in got], [lp for lp, _ in ref], rtol=1e-5, atol=LOGPROB_ATOL)
    with pytest.raises(ValueError, match="longer than the model's window"):
        loglikelihoods(model, [Request([1], [2] * (WINDOW + 1))], 1, "cpu")


def _lm_eval(tiny, workdir: Path) -> dict:
    """lm_eval.simple_evaluate on the export, offline, over local copies of the first N items (the task files
    in tests/assets/lm_eval_tasks read them from the working directory): its results and per-request scores."""
    with open(workdir / "hellaswag.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in read_hellaswag(tiny["hellaswag"], N))
    with open(workdir / "lambada.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in read_lambada(tiny["lambada"], N))
    eot = tiny["tok"].token_to_id("<|endoftext|>")
    script = f"""
import json, lm_eval
from lm_eval.tasks import TaskManager
r = lm_eval.simple_evaluate(
    model="hf",
    model_args="pretrained={tiny['export']},dtype=float32,device=cpu,max_length={WINDOW},prefix_token_id={eot}",
    tasks=["hellaswag_local", "lambada_local"], task_manager=TaskManager(include_path={str(TASK_DIR)!r}),
    batch_size=8, limit={N}, bootstrap_iters=0, log_samples=True)
samples = {{t: [[list(map(float, x)) for x in s["filtered_resps"]]
               for s in sorted(r["samples"][t], key=lambda s: s["doc_id"])] for t in r["samples"]}}
print("RESULT" + json.dumps({{"results": r["results"], "samples": samples}}))
"""
    env = {**os.environ, "HF_HOME": str(workdir / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


@pytest.mark.slow
def test_lm_evaluation_harness_gives_the_same_numbers(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    theirs = _lm_eval(tiny, tmp_path)
    ours = evaluate_tasks(EvalConfig(model=tiny["export"], tasks=["hellaswag", "lambada"], limit=N, batch=7,
                                     hellaswag=tiny["hellaswag"], lambada=tiny["lambada"]))
    hs, lb = theirs["results"]["hellaswag_local"], theirs["results"]["lambada_local"]
    assert ours["n"] == {"hellaswag": N, "lambada": N}
    # accuracies: the same number of items right
    assert round(ours["hellaswag"]["acc"] * N) == round(hs["acc,none"] * N)
    assert round(ours["hellaswag"]["acc_norm"] * N) == round(hs["acc_norm,none"] * N)
    assert round(ours["lambada"]["acc"] * N) == round(lb["acc,none"] * N)
    assert 0 < ours["lambada"]["acc"] < 1 and 0 < ours["hellaswag"]["acc_norm"] < 1  # the comparison means something
    assert ours["lambada"]["perplexity"] == pytest.approx(lb["perplexity,none"], rel=1e-4)
    acc = np.array(ours["hellaswag"]["acc"] * N > np.arange(N), float)  # N items, that many right: lm_eval's stderr
    assert ours["hellaswag"]["acc_stderr"] == pytest.approx(acc.std(ddof=1) / np.sqrt(N), rel=1e-9)

    # and request by request: lm_eval's (loglikelihood, is_greedy) against ours
    model = load_model(tiny["export"]).model
    tok = tiny["tok"]
    reqs = [encode_pair(tok, q, " " + c) for q, cs, _ in map(hellaswag_doc, read_hellaswag(tiny["hellaswag"], N))
            for c in cs]
    mine = loglikelihoods(model, reqs, 7, "cpu")
    their_hs = [x for doc in theirs["samples"]["hellaswag_local"] for x in doc]
    assert len(their_hs) == len(mine) == 4 * N
    assert np.allclose([lp for lp, _ in mine], [x[0] for x in their_hs], rtol=1e-5, atol=LOGPROB_ATOL)
    mine = loglikelihoods(model, [encode_pair(tok, *lambada_doc(t)) for t in read_lambada(tiny["lambada"], N)], 7,
                          "cpu")
    their_lb = [doc[0] for doc in theirs["samples"]["lambada_local"]]
    assert [g for _, g in mine] == [bool(x[1]) for x in their_lb]
    assert np.allclose([lp for lp, _ in mine], [x[0] for x in their_lb], rtol=1e-5, atol=LOGPROB_ATOL)


def test_a_checkpoint_scores_as_its_export(tiny, tmp_path):
    """A run dir with only a checkpoint: its weights, and the tokenizer of its run's dataset."""
    from app.config import to_dict
    from app.data.shards import Manifest
    from app.train import checkpoint
    from app.train.config import TrainConfig

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(os.path.join(tiny["export"], "tokenizer.json"), data / "tokenizer.json")
    Manifest(vocab_size=tiny["tok"].get_vocab_size(), eot_id=tiny["tok"].token_to_id("<|endoftext|>"),
             root=str(data)).save()
    model = load_model(tiny["export"]).model
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = TrainConfig(data=str(data), model={"max_seq_len": WINDOW})
    checkpoint.write(str(tmp_path / "run" / "checkpoint_00000005"),
                     checkpoint.snapshot(model, opt, sched, checkpoint.TrainState(step=5, config=to_dict(cfg))))
    kw = dict(tasks=["lambada"], lambada=tiny["lambada"], limit=8, batch=4)
    from_ckpt = evaluate_tasks(EvalConfig(model=str(tmp_path / "run"), **kw))
    from_export = evaluate_tasks(EvalConfig(model=tiny["export"], **kw))
    assert from_ckpt["model"]["kind"] == "checkpoint"
    assert from_ckpt["lambada"]["perplexity"] == pytest.approx(from_export["lambada"]["perplexity"], rel=1e-6)
    assert math.isfinite(from_ckpt["lambada"]["perplexity"])


def test_lmatch_model_is_scored_without_matches(tiny, tmp_path):
    tok = tiny["tok"]
    torch.manual_seed(0)
    V = tok.get_vocab_size()
    model = GPT(ModelConfig.preset("tiny", vocab_size=V, max_seq_len=WINDOW, lmatch_vocab=V + 1))
    model.init_weights()
    export = str(tmp_path / "lmatch")
    export_model(model, export, os.path.join(tiny["export"], "tokenizer.json"))
    res = evaluate_tasks(EvalConfig(model=export, tasks=["lambada"], lambada=tiny["lambada"], limit=4))
    assert res["lambada"]["n"] == 4 and any("all-NONE" in n for n in res["notes"])


CLI_ERRORS = [
    (["--tasks=hellaswag"], "--tasks=hellaswag needs --hellaswag=PATH"),
    (["--tasks=lambada", "--lambada=/missing.jsonl"], "--lambada=/missing.jsonl: no such file"),
    (["--tasks=piqa"], "unknown task 'piqa'; tasks: hellaswag, lambada"),
    (["--tasks=lambada", "--lambada={lambada}", "--model=/missing"], "/missing: no model here"),
    (["--tasks=lambada", "--lambada={lambada}", "--limit=-1"], "limit >= 0"),
]


@pytest.mark.parametrize("flags,says", CLI_ERRORS, ids=[" ".join(f) for f, _ in CLI_ERRORS])
def test_cli_refuses_bad_task_options_in_one_line(flags, says, shared_data, tmp_path, capsys, monkeypatch):
    from jobs import cli

    monkeypatch.chdir(tmp_path)
    argv = ["eval"] + [f.format(lambada=_paths(shared_data)[1]) for f in flags]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # parse_config exits; the preflight returns
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("eval: ") and says in err, err


def test_cli_prints_the_results_block(tiny, tmp_path, capsys):
    from jobs import eval as eval_job

    out = tmp_path / "tasks.json"
    assert eval_job.main([f"--model={tiny['export']}", "--tasks=hellaswag,lambada", f"--hellaswag={tiny['hellaswag']}",
                          f"--lambada={tiny['lambada']}", "--limit=3", "--batch=16", f"--output={out}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert set(printed["hellaswag"]) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert set(printed["lambada"]) >= {"acc", "perplexity"} and printed["n"] == {"hellaswag": 3, "lambada": 3}
