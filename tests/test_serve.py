"""lmforge serve through the official `openai` client and plain HTTP: completions, chat, streaming,
echo/logprobs for evaluation harnesses, tokenize, errors as the client's exception types, the
output filter, metrics. One live server for the module (test_serve_support.py)."""

from __future__ import annotations

import json

import openai
import pytest
import requests
import torch
from helpers import one_thread, token_cache  # noqa: F401  (fixtures are registered by import)
from test_serve_support import greedy_reference, live_server, loaded, trained_model_dir

from lmforge.finetune.instruct import chat_prompts
from lmforge.serve.limits import OutputFilter


@pytest.fixture(scope="module")
def served():
    with live_server(max_tokens=64, output_filter=OutputFilter(["glitters"])) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_completion_is_generate_greedy(client):
    model, tokenizer = loaded()
    out = client.completions.create(model="tiny", prompt="The quick", max_tokens=24, temperature=0)
    assert out.choices[0].text == greedy_reference(model, tokenizer, "The quick", 24)
    assert "brown fox" in out.choices[0].text  # the model did learn something
    assert out.usage.prompt_tokens == len(tokenizer.encode("The quick"))
    assert out.usage.completion_tokens == 24 and out.choices[0].finish_reason == "length"


def test_streamed_completion_joins_to_the_whole_one(client):
    whole = client.completions.create(model="tiny", prompt="A stitch", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="A stitch", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices


def test_chat_uses_the_folder_template(client):
    model, tokenizer = loaded()
    messages = [{"role": "user", "content": "The dog"}]
    prompt = chat_prompts(trained_model_dir(), tokenizer, ["The dog"])[0]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == greedy_reference(model, tokenizer, prompt, 16)
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    deltas = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == out.choices[0].message.content


def test_stop_string_ends_the_choice(client):
    full = client.completions.create(model="tiny", prompt="The quick", max_tokens=24, temperature=0).choices[0]
    out = client.completions.create(model="tiny", prompt="The quick", max_tokens=24, temperature=0, stop=["fox"])
    assert out.choices[0].text == full.text[: full.text.index("fox")]
    assert out.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_n_gives_distinct_seeds(client):
    ask = dict(model="tiny", prompt="The", max_tokens=16, temperature=1.0, seed=5)
    one, two = (client.completions.create(**ask).choices[0].text for _ in range(2))
    assert one == two
    many = client.completions.create(**ask, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.choices[0].text == one
    assert many.usage.prompt_tokens == len(loaded()[1].encode("The"))  # the prompt counts once


def _model_logprobs(ids: list[int]) -> torch.Tensor:
    model, _ = loaded()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_score_the_prompt(served, max_tokens):
    """What lm-evaluation-harness's local-completions sends and reads for log-likelihoods."""
    _, tokenizer = loaded()
    prompt = "The dog sleeps"
    ids = tokenizer.encode(prompt)
    body = requests.post(served[0] + "/v1/completions", json={
        "model": "tiny", "prompt": [ids], "max_tokens": max_tokens, "temperature": 0, "logprobs": 2,
        "echo": True, "seed": 1234}, timeout=30).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = _model_logprobs(ids)
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(float(expected[t - 1, ids[t]]), abs=1e-5)
        assert len(lp["top_logprobs"][t]) == 2
        assert max(lp["top_logprobs"][t].values()) == pytest.approx(float(expected[t - 1].max()), abs=1e-5)
    assert body["choices"][0]["text"].startswith(prompt)
    lm_eval = pytest.importorskip("lm_eval.models.openai_completions")
    context = len(ids) - 3  # score the last three prompt tokens given the rest, as the harness does
    if max_tokens == 1:
        (total, _), = lm_eval.LocalCompletionsAPI.parse_logprobs(body, ctxlens=[context])
        assert total == pytest.approx(sum(float(expected[t - 1, ids[t]]) for t in range(context, len(ids))), abs=1e-4)


def test_generated_logprobs_match_the_model(client):
    _, tokenizer = loaded()
    out = client.completions.create(model="tiny", prompt="All that", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.token_logprobs) == 5
    ids = tokenizer.encode("All that") + tokenizer.encode(out.choices[0].text)
    expected = _model_logprobs(ids)
    first = len(tokenizer.encode("All that")) - 1
    for k, value in enumerate(lp.token_logprobs):
        assert value == pytest.approx(float(expected[first + k].max()), abs=1e-4)  # greedy: the best token
        assert len(lp.top_logprobs[k]) == 3


def test_tokenize_round_trip_and_models(served, client):
    url = served[0]
    tokens = requests.post(url + "/tokenize", json={"prompt": "The fox", "add_special_tokens": False}).json()["tokens"]
    assert tokens == loaded()[1].encode("The fox")
    assert requests.post(url + "/detokenize", json={"tokens": tokens}).json() == {"prompt": "The fox"}
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert "eos_token" in requests.get(url + "/tokenizer_info").json()


def test_errors_are_the_clients_exception_types(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.completions.create(model="tiny", prompt="x", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt="", max_tokens=1)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature="hot")
    with pytest.raises(openai.APIStatusError) as too_long:
        client.completions.create(model="tiny", prompt="x" * 65, max_tokens=1)
    assert too_long.value.status_code == 413 and too_long.value.code == "context_length_exceeded"


def test_openai_error_shape(served):
    r = requests.post(served[0] + "/v1/completions", data=b'{"prompt": ', timeout=10)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert requests.get(served[0] + "/v1/nothing").status_code == 404


def test_blocked_word_is_masked_streamed_or_not(client):
    """'glitters' comes from the model one character per chunk: the filter still catches it."""
    model, tokenizer = loaded()
    raw = greedy_reference(model, tokenizer, "All that", 30)
    assert "glitters" in raw
    expected = raw.replace("glitters", "********")
    whole = client.completions.create(model="tiny", prompt="All that", max_tokens=30, temperature=0)
    assert whole.choices[0].text == expected
    chunks = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="All that", max_tokens=30, temperature=0, stream=True)]
    assert "".join(chunks) == expected and len([c for c in chunks if c]) > 5


def test_metrics_count_requests_and_tokens(served, client):
    client.completions.create(model="tiny", prompt="The", max_tokens=3, temperature=0)
    requests.post(served[0] + "/v1/completions", data=b"nonsense")
    text = requests.get(served[0] + "/metrics").text
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="400"}' in text
    for name in ("lmforge_queue_depth", "lmforge_running_requests", "lmforge_generation_tokens_total",
                 "lmforge_time_to_first_token_seconds_bucket", "lmforge_request_latency_seconds_count"):
        assert name in text
    generated = [line for line in text.splitlines() if line.startswith("lmforge_generation_tokens_total")]
    assert float(generated[0].split()[-1]) >= 3


def test_sse_lines_are_openai_shaped(served):
    with requests.post(served[0] + "/v1/completions", json={"prompt": "The", "max_tokens": 3, "stream": True},
                       stream=True, timeout=30) as r:
        lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_lm_eval_remote_tokenizer_reads_the_server(served):
    """lm-evaluation-harness probes /tokenizer_info and /tokenize, then tokenizes through them."""
    utils = pytest.importorskip("lm_eval.utils")
    url = served[0] + "/v1/completions"
    assert utils.check_remote_tokenizer_support(url)
    remote, (_, tokenizer) = utils.RemoteTokenizer(url), loaded()
    assert remote.encode("The dog sleeps") == tokenizer.encode("The dog sleeps")
    assert remote.decode(tokenizer.encode("glitters")) == "glitters"
    assert remote.eos_token_id == tokenizer.eos_id
    chat = remote.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == chat_prompts(trained_model_dir(), tokenizer, ["hi"])[0]


def test_a_hugging_face_folder_serves_transformers_greedy_tokens(tmp_path):
    """A GPT-2 folder as transformers saves it, converted as it loads: the server's greedy
    continuation is transformers' own `generate`."""
    transformers = pytest.importorskip("transformers")
    from lmforge.model_folder import load_model
    from lmforge.tokenize import Tokenizer

    tokenizer = Tokenizer.train("bpe", ["the quick brown fox jumps over the lazy dog. " * 30], vocab_size=300)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    ids = tokenizer.encode("the quick brown")
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                               eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)[0, len(ids):]
    model, served_tokenizer = load_model(tmp_path)
    with live_server(model, served_tokenizer, name="gpt2-tiny") as (url, _):
        out = requests.post(url + "/v1/completions", json={"model": "gpt2-tiny", "prompt": [ids], "max_tokens": 12,
                                                           "temperature": 0}, timeout=30).json()
    assert out["choices"][0]["text"] == tokenizer.decode(expected)
    assert out["usage"]["completion_tokens"] == len(expected) == 12 and out["choices"][0]["text"]


def test_lm_eval_local_completions_scores_what_the_model_scores(served):
    """lm-evaluation-harness's own client (local-completions, remote tokenizer) against the
    server: its log-likelihoods are the model's, computed here directly."""
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    api = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    lm = api.LocalCompletionsAPI(base_url=served[0] + "/v1/completions", model="tiny", tokenizer_backend="remote",
                                 num_concurrent=2, max_retries=1, max_length=64)
    pairs = [("The quick brown", " fox"), ("A stitch in time", " saves nine"), ("All that", " is gold")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                               disable_tqdm=True)
    model, tokenizer = loaded()
    for (context, continuation), (score, greedy) in zip(pairs, results, strict=True):
        ids, start = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
        scores = _model_logprobs(ids)
        assert score == pytest.approx(sum(float(scores[t - 1, ids[t]]) for t in range(start, len(ids))), abs=1e-4)
        assert greedy == all(int(scores[t - 1].argmax()) == ids[t] for t in range(start, len(ids)))


def test_server_greedy_equals_the_generate_command(client, capsys):
    """The same as `lmforge generate MODEL --temperature 0 --max-new-tokens 24 --json`, run here."""
    from lmforge.cli import main

    prompts = ["The quick", "A stitch in time", "sun"]
    argv = ["generate", str(trained_model_dir()), "--temperature", "0", "--max-new-tokens", "24", "--json"]
    for prompt in prompts:
        assert main([*argv, "--prompt", prompt]) == 0
    printed = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
    served = [client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0).choices[0].text
              for p in prompts]
    assert served == [OutputFilter(["glitters"]).mask(text) for text in printed]  # this server's blocklist
