import pytest
import yaml

from efficientllm_utils import cli
from efficientllm_utils.params import PARAMS_DIR, ParamsError, expand, params_path

GOOD = """
study: quantization
notebook: notebooks/llm/quantization.ipynb
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
