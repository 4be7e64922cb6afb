"""The quickstart pipeline end to end (a shortened run): tokenize -> train -> serve -> completion."""
import sysconfig

from app.quickstart import QuickstartConfig, run_quickstart, stdlib_corpus


def test_default_corpus_exists_everywhere():
    import glob

    assert len(glob.glob(stdlib_corpus()[0])) > 50


def test_quickstart_pipeline_gives_a_completion(ray_session, tmp_path):
    stdlib = sysconfig.get_paths()["stdlib"]
    cfg = QuickstartConfig(workdir=str(tmp_path / "qs"), inputs=[f"{stdlib}/[a-c]*.py"], vocab_size=512,
                           max_steps=20, max_tokens=8)
    text = run_quickstart(cfg)
    assert isinstance(text, str) and text  # a completion came back over HTTP
    assert (tmp_path / "qs" / "runs" / "quickstart" / "export" / "config.json").exists()
    assert run_quickstart(cfg)  # a second run reuses the finished stages
