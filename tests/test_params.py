import pytest
import yaml

from efficientllm_utils import cli
from efficientllm_utils.params import PARAMS_DIR, ParamsError, expand, params_path

GOOD = """
study: quantization
default_profile: a
profiles:
  a:
    description: test
    hardware: any
    fixed: {model: smollm2-135m-instruct}
    grid: {precision: [fp32, int4-nf4]}
"""


def test_every_shipped_params_file_expands():
    for path in PARAMS_DIR.glob("*.yaml"):
        declared = yaml.safe_load(path.read_text())
        assert declared["default_profile"] in declared["profiles"], path.name
        for profile in ("cpu", "smoke", "gpu", "paper"):
            if profile not in declared["profiles"]:  # absent from this file: refused, naming it
                with pytest.raises(ParamsError, match=f"profile.*{profile!r}.*is not one of"):
                    expand(path, profile)
                continue
            specs = expand(path, profile)  # a present profile expands: any error fails here
            assert specs and all(s.study == path.stem for s in specs)


def test_run_ids_are_stable_and_depend_on_every_parameter(params_file):
    path = params_file(GOOD)
    first, again = expand(path), expand(path)
    assert [s.run_id for s in first] == [s.run_id for s in again]
    assert len({s.run_id for s in first}) == 2
    changed = expand(path, overrides={"new_tokens": 7})
    assert {s.run_id for s in changed}.isdisjoint({s.run_id for s in first})
    assert first[0].run_id.startswith("precision=fp32-")


def test_unknown_precision_names_field_and_allowed_values(params_file):
    path = params_file(GOOD.replace("int4-nf4", "int3"))
    with pytest.raises(ParamsError) as err:
        expand(path)
    message = str(err.value)
    assert "field 'precision'" in message and "'int4-nf4'" in message and "int3" in message


@pytest.mark.parametrize("override, field", [({"colour": "red"}, "colour"), ({"model": "no-such-model"}, "model"),
                                             ({"n_per_task": 0}, "n_per_task"), ({"tasks": ["trivia"]}, "tasks.0")])
def test_bad_values_name_their_field(params_file, override, field):
    with pytest.raises(ParamsError, match=f"field '{field}'"):
        expand(params_file(GOOD), overrides=override)


def test_unknown_profile_lists_the_profiles(params_file):
    with pytest.raises(ParamsError, match=r"profile 'b' is not one of \['a'\]"):
        expand(params_file(GOOD), "b")


def test_cli_bad_parameter_exits_2_and_writes_nothing(results_root, capsys):
    code = cli.main(["run", "quantization", "--set", "precision=int3", "--results", str(results_root)])
    assert code == 2
    assert "field 'precision'" in capsys.readouterr().err
    assert list(results_root.iterdir()) == []


def test_cli_unknown_axis_exits_2(capsys):
    assert cli.main(["list", "nonsense"]) == 2
    assert "quantization" in capsys.readouterr().err


def test_params_path_points_into_params_dir():
    assert params_path("quantization") == PARAMS_DIR / "quantization.yaml"


# --- labels read from params; --set and --grid on grid fields; explored runs (issue 25) ----------------------------

def _check_labels(specs, profile: str) -> None:
    """Each label names exactly what its run executes with: every ``k=v`` part is the run's value of ``k``, the
    fields the profile's grid varies all appear, every field that departs from the profile appears, and a run is
    recorded apart (``<profile>+explore``) exactly when something departs."""
    from efficientllm_utils.params import label_value

    assert len({s.label for s in specs}) == len(specs), "two runs with one label"
    for spec in specs:
        parts = dict(part.split("=", 1) for part in spec.label.split(",")) if spec.label else {}
        assert all(label_value(spec.params[k]) == v for k, v in parts.items()), (spec.label, spec.params)
        if spec.explored is None:
            assert spec.profile == profile
        else:
            assert spec.profile == profile + "+explore" and spec.explored.profile == profile
            assert spec.explored.changed and set(spec.explored.changed) <= set(parts)
            assert all(spec.params[k] == v for k, v in spec.explored.changed.items())


def test_labels_agree_with_params_in_every_study_and_profile():
    from efficientllm_utils.params import load_params_file

    for path in sorted(PARAMS_DIR.glob("*.yaml")):
        for name, profile in load_params_file(path).profiles.items():
            own = expand(path, name)
            _check_labels(own, name)
            assert all(s.explored is None for s in own)
            assert all(set(profile.grid) <= {p.split("=", 1)[0] for p in s.label.split(",")} for s in own)
            reseeded = expand(path, name, {"seed": 12345})  # a fixed setting every study has, changed in every run
            _check_labels(reseeded, name)
            assert len(reseeded) == len(own) and all(s.explored.changed == {"seed": 12345} for s in reseeded)
            for key, values in profile.grid.items():  # --set on a grid field: that value's runs alone, the profile's
                narrowed = expand(path, name, {key: values[-1]})
                _check_labels(narrowed, name)
                value = narrowed[0].params[key]
                assert {s.run_id for s in narrowed} == {s.run_id for s in own if s.params[key] == value}


def test_set_on_a_grid_field_runs_that_value_alone():
    own = {s.label: s for s in expand(params_path("quantization"), "cpu")}
    (nf4,) = expand(params_path("quantization"), "cpu", {"precision": "int4-nf4"})
    assert nf4 == own["precision=int4-nf4"] and nf4.params["precision"] == "int4-nf4" and nf4.explored is None


def test_a_value_outside_the_grid_is_an_explored_run():
    (fp4,) = expand(params_path("quantization"), "cpu", {"precision": "int4-fp4"})
    assert (fp4.label, fp4.profile, fp4.params["precision"]) == ("precision=int4-fp4", "cpu+explore", "int4-fp4")
    assert fp4.explored.changed == {"precision": "int4-fp4"} and fp4.explored.outside_grid == ["precision"]
    fewer = expand(params_path("quantization"), "cpu", {"n_per_task": 2, "precision": "fp32"})
    assert [s.label for s in fewer] == ["precision=fp32,n_per_task=2"] and fewer[0].explored.outside_grid == []


def test_grid_replaces_an_axis_and_keeps_the_profile_runs_it_names():
    own = {s.label: s for s in expand(params_path("quantization"), "cpu")}
    specs = expand(params_path("quantization"), "cpu", grid={"precision": ["int4-nf4", "int4-fp4"]})
    assert [s.label for s in specs] == ["precision=int4-nf4", "precision=int4-fp4"]
    assert specs[0] == own["precision=int4-nf4"] and specs[1].profile == "cpu+explore"
    with pytest.raises(ParamsError, match="both"):
        expand(params_path("quantization"), "cpu", {"precision": "int4-nf4"}, {"precision": ["fp32"]})
    with pytest.raises(ParamsError, match="field 'precision'.*int3"):
        expand(params_path("quantization"), "cpu", grid={"precision": ["int4-nf4", "int3"]})


def test_set_variant_selects_a_bundle_or_is_refused_naming_the_bundles(capsys):
    own = {s.label: s for s in expand(params_path("attention_free"), "cpu")}
    (rwkv,) = expand(params_path("attention_free"), "cpu", {"variant": "rwkv"})
    assert rwkv == own["variant=rwkv"] and rwkv.params["architecture"] == "rwkv"
    assert cli.main(["list", "attention_free", "--set", "variant=rwkv7"]) == 2
    err = capsys.readouterr().err
    assert "field 'variant'" in err and "rwkv7" in err
    assert all(f"'{v}'" in err for v in ("transformer", "mamba", "rwkv"))
    # a bundle's field set in every run: the runs say so in their labels, apart from the profile's own
    specs = {s.label: s for s in expand(params_path("attention_free"), "cpu", {"architecture": "mamba"})}
    assert specs["variant=mamba"] == own["variant=mamba"]
    assert specs["variant=rwkv,architecture=mamba"].params["architecture"] == "mamba"


def test_cli_list_with_set_and_grid(capsys):
    assert cli.main(["list", "quantization", "--set", "precision=int4-nf4"]) == 0
    out, err = capsys.readouterr()
    (nf4,) = [s for s in expand(params_path("quantization")) if s.params["precision"] == "int4-nf4"]
    assert out.splitlines() == [f"quantization\tcpu\t{nf4.run_id}\tprecision=int4-nf4"]
    assert "outside" not in err
    assert cli.main(["list", "quantization", "--grid", "precision=int4-nf4,int4-fp4"]) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[1::2] for line in out.splitlines()] == [["cpu", "precision=int4-nf4"],
                                                                     ["cpu+explore", "precision=int4-fp4"]]
    assert "outside profile 'cpu'" in err and "precision=int4-fp4" in err and "cpu+explore" in err


def test_profile_names_of_explored_runs_are_reserved(params_file):
    with pytest.raises(ParamsError, match="reserved"):
        expand(params_file(GOOD.replace("  a:\n", "  manual:\n").replace("default_profile: a",
                                                                        "default_profile: manual")))


def test_a_notebook_run_by_hand_is_labelled_from_its_parameters(monkeypatch, tmp_path):
    from efficientllm_utils import records
    from efficientllm_utils.studies.quantization_run import QuantizationRun
    from efficientllm_utils.studies.selftest_run import SelfTestRun

    monkeypatch.setattr(records, "RESULTS_DIR", tmp_path)
    p = SelfTestRun(value=7)
    run = records.RunContext.from_namespace({"study": "selftest", "run_id": None, "result_dir": None}, p)
    assert (run.label, run.profile, run.explored.how) == ("value=7", "manual", "notebook")
    assert run.explored.outside_grid == ["value"] and run.params["value"] == 7
    assert run.result_dir == tmp_path / "selftest" / "manual" / run.run_id
    first = expand(params_path("quantization"))[0]  # the notebook's defaults as the profile has them: its label
    same = records.RunContext.from_namespace({"study": "quantization"}, QuantizationRun(**first.params))
    assert same.label == first.label and same.explored.changed == {}
    with pytest.raises(ParamsError, match="field 'study'"):
        records.RunContext.from_namespace({"study": None}, p)
