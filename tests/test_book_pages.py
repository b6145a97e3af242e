"""Run pages as the book shows them: titled by their grid point, without library noise or machine paths."""
import json

from efficientllm_utils import book
from efficientllm_utils.records import RunRecord, write_record


def _stream(text, name="stderr"):
    return {"output_type": "stream", "name": name, "text": text}


def test_a_run_page_is_titled_by_its_grid_point_without_noise_or_machine_paths(tmp_path):
    results = tmp_path / "results"
    run = results / "quantization" / "cpu" / "precision=int4-nf4-abc"
    run.mkdir(parents=True)
    notebook = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["# Inference quantization: one model at one precision\n",
                                                             "\n", "One grid point."]},
        {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "execution_count": 1,
         "source": f'result_dir = "{run}"', "outputs": []},
        {"cell_type": "code", "metadata": {}, "execution_count": 2, "source": "q.load(p)", "outputs": [
            _stream("\rLoading weights:   0%|          | 0/272 [00:00<?, ?it/s]\rLoading weights: 100%|##| 272/272\n"),
            _stream("/x/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found.\n"
                    "  from .autonotebook import tqdm as notebook_tqdm\n"),
            _stream("Failed to load CPU gemm_4bit_forward from kernels-community: no module named kernels\n"),
            _stream(f"wrote {run}/record.json\nkept line\n", "stdout"),
            {"output_type": "execute_result", "execution_count": 2, "metadata": {},
             "data": {"text/plain": f"'{results}'"}},
        ]}],
        "metadata": {"papermill": {"output_path": str(run / "notebook.ipynb")}}, "nbformat": 4, "nbformat_minor": 5}
    (run / "notebook.ipynb").write_text(json.dumps(notebook))
    write_record(RunRecord(run_id="precision=int4-nf4-abc", study="quantization", profile="cpu",
                           label="precision=int4-nf4", status="ok",
                           params={"model": "smollm2-135m-instruct", "precision": "int4-nf4"}), run)

    [page] = book.copy_run_notebooks(results, tmp_path / "book")
    text = page.read_text()
    assert str(tmp_path) not in text  # nowhere: sources, outputs, metadata
    nb = json.loads(text)
    title = "".join(nb["cells"][0]["source"])
    assert title.startswith("# Quantization: smollm2-135m-instruct at int4-nf4\n")
    assert "Inference quantization: one model at one precision" in title and "One grid point." in title
    assert "".join(nb["cells"][1]["source"]) == 'result_dir = "quantization/cpu/precision=int4-nf4-abc"'
    outputs = nb["cells"][2]["outputs"]
    assert [o["output_type"] for o in outputs] == ["stream", "execute_result"]  # the noise-only streams are gone
    assert outputs[0]["text"] == "wrote quantization/cpu/precision=int4-nf4-abc/record.json\nkept line\n"
    assert outputs[1]["data"]["text/plain"] == "'.'"


def test_run_titles_name_every_grid_key():
    assert book.run_title("attention", "attention=gqa", {"attention": "gqa"}) == "Attention: gqa"
    assert book.run_title("peft", "method=qlora", {"method": "qlora"}) == "PEFT: qlora"
    assert book.run_title("quantization", "model=Qwen/Qwen2.5-7B-Instruct,precision=bf16",
                          {"model": "Qwen/Qwen2.5-7B-Instruct", "precision": "bf16"}) == "Quantization: Qwen2.5-7B-Instruct at bf16"
    assert book.run_title("attention", "size=1.5B,attention=mla", {}) == "Attention: mla (size=1.5B)"
    assert book.run_title("newstudy", "x=1,y=2", {}) == "newstudy: 1, 2"
