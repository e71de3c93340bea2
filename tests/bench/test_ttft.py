import json

from conftest import tiny_refrag
from typer.testing import CliRunner

from refrag import checkpoint
from refrag.bench.ttft import bench_ttft, context_request, plot_ttft
from refrag.cli import app


def test_context_request_has_exact_length():
    model = tiny_refrag("llama", k=4)
    request = context_request(model, 100, passage_tokens=32)
    assert sum(p.num_tokens for p in request.passages) == 100
    assert [p.num_tokens for p in request.passages] == [32, 32, 32, 4]


def test_bench_rows_and_plot(tmp_path):
    model = tiny_refrag("llama", k=4)
    report = bench_ttft(model, [64, 128], repeats=1, ttit_tokens=3, throughput_batch=2, throughput_s=64,
                        progress=False)
    assert [r.s for r in report.rows] == [64, 128]
    for r in report.rows:
        assert r.positions_full - r.positions_refrag == r.s - r.s // 4
        assert r.kv_bytes_refrag < r.kv_bytes_full
        assert r.ratio_cached == r.ttft_full_s / r.ttft_cached_s
        assert all(len(v) == 1 for v in r.samples_s.values()) and r.samples_s["full"] == [r.ttft_full_s]
    assert report.throughput is not None and report.throughput.batch == 2
    data = report.to_json()
    assert set(data["rows"][0]) >= {"s", "ttft_full_s", "ttft_cached_s", "ttft_uncached_s", "ratio_cached",
                                    "ratio_uncached"}
    png = plot_ttft(report, tmp_path / "ttft.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.expansion == "none" and all(r.policy_s == 0 for r in report.rows)


def test_bench_with_an_expansion_policy_times_it_inside_refrag_ttft():
    from refrag.config import CompressionOptions

    model = tiny_refrag("llama", k=4)
    options = CompressionOptions(policy="lexical", expand_tokens=16)
    report = bench_ttft(model, [64], repeats=1, ttit_tokens=2, throughput_batch=0, compression=options, progress=False)
    (row,) = report.rows
    assert report.expansion == "lexical 16 positions" and 0 < row.policy_s < row.ttft_cached_s
    assert row.positions_refrag == 64 // 4 + 16 - 16 // 4 + (row.positions_full - 64)  # 4 chunks raw: +12 positions


def test_cli_writes_a_plot_only_when_asked(tmp_path, monkeypatch):
    ckpt = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "tiny", save_decoder=True)
    monkeypatch.chdir(tmp_path)
    args = ["bench", "ttft", "--model", str(ckpt), "--dtype", "float32", "--lengths", "32", "--repeats", "1",
            "--batch", "0", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"][0]["s"] == 32 and not list(tmp_path.glob("*.png"))
    result = CliRunner().invoke(app, [*args, "--plot", "out.png"])
    assert result.exit_code == 0 and (tmp_path / "out.png").is_file()
