"""The server's pure parts (docs/serving.md): the shipped tokenizer, OpenAI request validation,
the [serve] table.  No web stack, no torch: part of the default suite."""

from __future__ import annotations

import pytest

from llmqueue.errors import ConfigError
from llmqueue.serve.protocol import APIError, Limits, parse_chat, parse_completion
from llmqueue.serve.settings import load_serve_config, serve_settings
from llmqueue.serve.tokenizer import EOS_ID, NUM_BYTE_IDS, ByteTokenizer, _pseudo_word, load_tokenizer

LIMITS = Limits("m", vocab_size=512, max_context=100, max_prompt=64, max_tokens=50, default_max_tokens=16)
TOK = ByteTokenizer(512)


@pytest.mark.parametrize("text", ["", "hello", "naïve café — 東京 🚀", "a\nb\tc\x00"])
def test_the_byte_tokenizer_gives_text_back_exactly(text):
    ids = TOK.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and all(3 <= i < NUM_BYTE_IDS for i in ids)
    assert TOK.decode(ids) == text
    d = TOK.detokenizer()   # streamed one token at a time: the same text
    assert "".join(d.step(i) for i in ids) + d.flush() == text


def test_a_multibyte_character_streams_once_whole():
    d = TOK.detokenizer()
    pieces = [d.step(i) for i in TOK.encode("é")]
    assert pieces == ["", "é"]


def test_every_id_above_the_bytes_has_its_own_word():
    words = [_pseudo_word(i) for i in range(75 * 76 + 10)]
    assert len(set(words)) == len(words) and all(w.startswith(" ") and w[1:].isalpha() for w in words)
    assert TOK.decode([NUM_BYTE_IDS, EOS_ID, NUM_BYTE_IDS + 1]) == " ba be"


def test_a_vocabulary_too_small_for_bytes_is_refused():
    with pytest.raises(ConfigError, match="at least 259"):
        ByteTokenizer(100)
    with pytest.raises(ConfigError, match="serve.tokenizer"):
        load_tokenizer("no/such/folder", 512)


def test_a_completion_request_is_parsed():
    call = parse_completion({"model": "m", "prompt": "hi", "max_tokens": 5, "stream": True,
                             "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0},
                            TOK, LIMITS)
    assert (call.prompt_ids, call.max_tokens, call.stream, call.include_usage, call.ignore_eos) == \
           (TOK.encode("hi"), 5, True, True, True)
    assert parse_completion({"model": "m", "prompt": [[7, 8, 9]]}, TOK, LIMITS).prompt_ids == [7, 8, 9]
    assert parse_completion({"model": "m", "prompt": "x"}, TOK, LIMITS).max_tokens == 16   # OpenAI's default


def test_a_chat_request_defaults_to_what_the_context_leaves():
    call = parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "yo"}]}]},
                      TOK, LIMITS)
    assert call.chat and TOK.decode(call.prompt_ids) == "user: yo\nassistant:"
    assert call.max_tokens == min(50, 100 - len(call.prompt_ids))
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 3},
                      TOK, LIMITS).max_tokens == 3


BAD = [
    ([], 400, None), ({"prompt": "x"}, 400, "model"), ({"model": 3, "prompt": "x"}, 400, "model"),
    ({"model": "other", "prompt": "x"}, 404, "model"), ({"model": "m"}, 400, "prompt"),
    ({"model": "m", "prompt": 5}, 400, "prompt"), ({"model": "m", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "m", "prompt": ""}, 400, "prompt"), ({"model": "m", "prompt": [1, 512]}, 400, "prompt"),
    ({"model": "m", "prompt": [True]}, 400, "prompt"), ({"model": "m", "prompt": "x" * 65}, 400, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"model": "m", "prompt": "x" * 60, "max_tokens": 50}, 400, "max_tokens"),   # over the context
    ({"model": "m", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "m", "prompt": "x", "stream": True, "stream_options": []}, 400, "stream_options"),
    ({"model": "m", "prompt": "x", "n": 2}, 400, "n"), ({"model": "m", "prompt": "x", "stop": ["\n"]}, 400, "stop"),
    ({"model": "m", "prompt": "x", "temperature": 9}, 400, "temperature"),
    ({"model": "m", "prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ({"model": "m", "prompt": "x", "ignore_eos": 1}, 400, "ignore_eos"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_completion_requests_get_an_openai_error_naming_the_parameter(body, status, param):
    with pytest.raises(APIError) as exc:
        parse_completion(body, TOK, LIMITS)
    err = exc.value
    assert (err.status, err.param) == (status, param)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"} and err.message


@pytest.mark.parametrize("messages,param", [(None, "messages"), ([], "messages"), (["hi"], "messages[0]"),
                                            ([{"role": "robot", "content": "x"}], "messages[0].role"),
                                            ([{"role": "user", "content": 5}], "messages[0].content"),
                                            ([{"role": "user", "content": [{"type": "image_url"}]}],
                                             "messages[0].content")])
def test_bad_chat_messages_are_refused(messages, param):
    with pytest.raises(APIError) as exc:
        parse_chat({"model": "m", "messages": messages}, TOK, LIMITS)
    assert (exc.value.status, exc.value.param) == (400, param)


def test_the_serve_table_is_checked():
    assert serve_settings({"max_waiting": 4, "model_name": "x"}).max_waiting == 4
    for spec, field in [({"max_waiting": 0}, "serve.max_waiting"), ({"nope": 1}, "serve.nope"),
                        ({"request_timeout_s": -1}, "serve.request_timeout_s"), ({"model_name": ""}, "serve.model_name"),
                        ({"default_max_tokens": 99, "max_tokens": 10}, "serve.default_max_tokens")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            serve_settings(spec)


def test_a_serve_config_splits_into_its_tables(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[engine]\nscheduler = "sarathi"\n[real]\nmodel = {preset = "tiny"}\n[serve]\nmax_waiting = 3\n')
    cfg, real, settings = load_serve_config(path, ["serve.model_name=tiny"])
    assert cfg.engine["scheduler"] == "sarathi" and real["model"] == {"preset": "tiny"}
    assert (settings.max_waiting, settings.model_name) == (3, "tiny")
    path.write_text("serve = 3\n")
    with pytest.raises(ConfigError, match="serve = 3"):
        load_serve_config(path)


def test_serve_bench_verdicts_near_saturation():
    """serve-bench's verdict per rate: Theorem 2 at ρ = λ/λ* and the simulator over a long run with
    the same batch-time fit agree on each side of λ*; the table shows them (docs/serving.md)."""
    from pathlib import Path

    from llmqueue.runner import analysis_of, build_workload
    from llmqueue.serve import bench

    cfg, _, _ = load_serve_config(Path(__file__).parents[1] / "docs" / "serving" / "small.toml")
    capacity = analysis_of(cfg, build_workload(cfg)).max_stable_rate_rps
    assert bench.theorem2(0.8) == "stable" and bench.theorem2(1.3) == "unstable"
    assert bench.theorem2(0.8, work_conserving=False) == "-"     # Theorem 2 says nothing of it
    below, reason = bench.simulated_verdict(cfg, 0.6 * capacity, horizon_s=120)
    above, _ = bench.simulated_verdict(cfg, 1.3 * capacity, horizon_s=120)
    assert (below, above) == ("stable", "unstable"), reason
    row = {"rate_rps": 1.3 * capacity, "load": 1.3, "batch_time_ratio": {"served": 1.0, "near": 1.0},
           "verdict": {"theorem2": "unstable", "simulated": above, "theorem2_run": "unstable"}}
    for key in ("measured", "predicted", "predicted_near", "predicted_run"):
        row[key] = {"ttft_s": 0.05, "tpot_s": 0.02, "throughput_rps": capacity}
    for key in ("error", "error_near", "error_run"):
        row[key] = {"ttft_s": 0.0, "tpot_s": 0.0}
    lines = bench.table({"rows": [row], "saturation": {"capacity_rps": capacity, "grid_capacity_rps": capacity}})
    assert lines[0].endswith("verdict: Theorem 2 / simulated / run's batches |")
    assert lines[2].endswith("| unstable / unstable / unstable |")
