"""megalodon-serve-cluster's command line: every megalodon-serve option plus the cluster's own."""

from __future__ import annotations

import pytest

from megalodon_cluster.app import ClusterOptions, build, replica_settings
from megalodon_cluster.cli import build_parser, parse
from server.cli import build_parser as server_parser
from server.settings import ServerSettings


def test_every_megalodon_serve_option_is_a_cluster_option_too():
    def flags(parser):
        return {option for action in parser._actions for option in action.option_strings}

    cluster_flags = flags(build_parser())
    assert flags(server_parser()) <= cluster_flags
    assert {"--replicas", "--replica-gpus", "--ray-address", "--num-cpus", "--balance"} <= cluster_flags


def test_flags_split_into_settings_options_and_how_to_reach_ray(monkeypatch):
    monkeypatch.setenv("MEGALODON_MAX_WAITING_REQUESTS", "7")
    settings, options, launch = parse(["--replicas", "3", "--max-num-seqs", "4", "--ray-address", "auto",
                                       "--replica-cpus", "2", "--state-store-dir", "/tmp/states"])
    assert (settings.max_num_seqs, settings.max_waiting_requests) == (4, 7)
    assert str(settings.state_store_dir) == "/tmp/states"
    assert (options.replicas, options.replica_cpus, launch["ray_address"]) == (3, 2.0, "auto")
    values = replica_settings(settings, options)
    assert ServerSettings(**values) == settings.model_copy(update={"torch_threads": 2})  # Ray reserved 2 CPUs
    assert options.gpus(settings) == 0 and options.gpus(settings.model_copy(update={"device": "cuda:0"})) == 1


@pytest.mark.parametrize("argv", [["--replicas", "0"], ["--balance", "0.5"], ["--max-num-seqs", "x"]])
def test_bad_values_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2 and "error" in capsys.readouterr().err


def test_config_file_args_mix_settings_and_cluster_options():
    app = build({"replicas": 2, "max_num_seqs": 4, "balance": 1.5})
    assert app is not None
    with pytest.raises(ValueError):
        build({"replicas": 2, "not_an_option": 1})
    assert set(ClusterOptions.model_fields).isdisjoint(ServerSettings.model_fields)
