"""`sweeper data list / fetch / verify` through click's CliRunner, on real files."""

from __future__ import annotations

import shutil
import socket

from click.testing import CliRunner

from sweeper.cli import main

CALTECH = "Caltech101Silhouettes/caltech101_silhouettes_28_split1.mat"
FREY = "Freyfaces/frey_rawface.mat"


def _states(output: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in output.splitlines() if not line.startswith("data root")}


def test_list_shows_present_and_missing_datasets(shared_datasets, tmp_path):
    # A data root holding a chosen set of files, so what happens to be fetched elsewhere does not matter.
    for path in (CALTECH, FREY):
        (tmp_path / path).parent.mkdir()
        shutil.copyfile(shared_datasets / path, tmp_path / path)
    result = CliRunner().invoke(main, ["data", "list", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"data root: {tmp_path}"
    rows = _states(result.stdout)
    assert set(rows) == {"static_mnist", "dynamic_mnist", "fashion_mnist", "caltech101", "frey_faces", "omniglot"}
    for name in ("caltech101", "frey_faces"):
        assert rows[name][-1] == "ok", rows[name]
    for name in ("static_mnist", "dynamic_mnist", "fashion_mnist", "omniglot"):
        assert rows[name][-1] == "missing", rows[name]
    assert rows["static_mnist"][1:3] == ["bernoulli", "50000/10000/10000"]
    assert rows["frey_faces"][1:3] == ["logistic256", "1565/200/200"]
    assert rows["caltech101"][2] == "4100/2264/2307"


def test_truncated_file_is_corrupt_and_verify_fails(shared_datasets, tmp_path):
    (tmp_path / "Caltech101Silhouettes").mkdir()
    (tmp_path / CALTECH).write_bytes((shared_datasets / CALTECH).read_bytes()[:400_000])
    shutil.copytree(shared_datasets / "Freyfaces", tmp_path / "Freyfaces")
    runner = CliRunner()
    listed = runner.invoke(main, ["data", "list", "--root", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    rows = _states(listed.stdout)
    assert rows["caltech101"][-1] == "corrupt" and rows["frey_faces"][-1] == "ok"
    assert rows["static_mnist"][-1] == "missing"

    verified = runner.invoke(main, ["data", "verify", "--root", str(tmp_path)])
    assert verified.exit_code == 1
    assert str(tmp_path / CALTECH) in verified.stderr and "sweeper data fetch caltech101" in verified.stderr
    assert "delete it" in verified.stderr and "400000 bytes, expected 872124" in verified.stdout


def test_verify_passes_on_the_shared_datasets(shared_datasets):
    result = CliRunner().invoke(main, ["data", "verify", "--root", str(shared_datasets)])
    assert result.exit_code == 0, result.output
    assert "corrupt" not in result.output


def test_fetch_downloads_from_a_mirror_and_rejects_unknown_names(file_server, shared_datasets, tmp_path):
    file_server.serve(FREY, (shared_datasets / FREY).read_bytes())
    runner = CliRunner(env={"SWEEPER_DATA_MIRROR": file_server.url})
    result = runner.invoke(main, ["data", "fetch", "frey_faces", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / FREY).read_bytes() == (shared_datasets / FREY).read_bytes()
    assert f"frey_faces: ok {tmp_path / FREY}" in result.stdout

    unknown = runner.invoke(main, ["data", "fetch", "frey_face", "--root", str(tmp_path)])
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("error: unknown dataset 'frey_face'; did you mean 'frey_faces'?")


def test_fetch_offline_is_a_clear_error_and_leaves_nothing(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed below: the connection is refused
    runner = CliRunner(env={"SWEEPER_DATA_MIRROR": base})
    root = tmp_path / "data"
    result = runner.invoke(main, ["data", "fetch", "caltech101", "--root", str(root)])
    assert result.exit_code == 1
    assert f"{base}/{CALTECH}" in result.stderr
    assert f"put it at {root / CALTECH}" in result.stderr
    # How to use files already on this machine instead.
    assert f"The data folder is {root}" in result.stderr and "point SWEEPER_DATA_DIR (or --root)" in result.stderr
    assert list(tmp_path.iterdir()) == []       # neither the data root nor Caltech101Silhouettes/
