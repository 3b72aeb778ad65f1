"""The library as a Python user meets it: unambiguous public names, and the README's snippet as written."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import textwrap

import torch

from cvae_cli.checkpoints import save_model, save_sd_vae
from cvae_cli.model import CausalVAE
from cvae_cli.model.config import image_config
from conftest import REPO, random_model


def test_public_names_are_never_submodules_whatever_was_imported_first():
    """`import cvae_cli.inflate` binds the module to `cvae_cli.inflate`; a package that looked its
    function up lazily then handed `from cvae_cli import inflate` a module ("'module' object is not
    callable"). Every submodule is imported first here, in a fresh process."""
    code = textwrap.dedent("""
        import importlib, pkgutil, types
        import cvae_cli
        for m in pkgutil.walk_packages(cvae_cli.__path__, "cvae_cli."):
            if m.name.endswith("__main__"):  # runs the command line
                continue
            try:
                importlib.import_module(m.name)
            except ImportError:  # an optional extra (matplotlib, ...)
                pass
        from cvae_cli import inflate
        assert callable(inflate) and not isinstance(inflate, types.ModuleType), inflate
        bad = [n for n in cvae_cli.__all__ if isinstance(getattr(cvae_cli, n), types.ModuleType)]
        assert not bad, bad
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def readme_python() -> str:
    """The ```python block of the README's "Python" section (other sections' snippets have their own tests)."""
    section = re.search(r"^## Python\n(.*?)(?=^## |\Z)", (REPO / "README.md").read_text(), flags=re.S | re.M)
    assert section, "the README has a Python section"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), flags=re.S)
    assert blocks, "the README's Python section has a snippet"
    return "\n".join(blocks)


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    """Stand-ins, nothing else changed: the snippet's undefined `clip` is a small clip, a hub id it
    names is a tiny local model, an `sd-vae` file it names is a tiny SD image VAE; a file it names
    that is a video is the example clip. Inference keeps no autograd graph (9.9 against 2.1 GB on
    a 17-frame clip) and a decoded video stays in [-1, 1]."""
    code = readme_python()
    tiny = tmp_path / "tiny.safetensors"
    save_model(random_model(), tiny)
    torch.manual_seed(0)
    sd_vae = CausalVAE(image_config(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=1))
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value:
            name = node.value
            if "sd-vae" in name:
                save_sd_vae(sd_vae, tmp_path / name)
            elif name.endswith((".mp4", ".mov", ".mkv", ".webm")):
                shutil.copy(REPO / "examples" / "cockatoo.mp4", tmp_path / name)
            elif name.endswith(".csv"):  # a manifest: one clip of the example's first 17 frames
                shutil.copy(REPO / "examples" / "cockatoo.mp4", tmp_path / "cockatoo.mp4")
                (tmp_path / name).write_text("path,end\ncockatoo.mp4,17\n")
            elif re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w.-]+)?", name) and not name.endswith(".safetensors"):
                code = code.replace(repr(name), repr(str(tiny))).replace(f'"{name}"', repr(str(tiny)))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    scope = {"clip": clip}
    exec(compile(code, "README.md", "exec"), scope)
    tensors = {k: v for k, v in scope.items() if isinstance(v, torch.Tensor) and k != "clip"}
    assert tensors, "the snippet makes no tensor"
    for name, value in tensors.items():
        assert not value.requires_grad, f"{name} carries an autograd graph: run the model under torch.no_grad()"
    video = scope["video"]
    assert video.shape == clip.shape and -1 <= video.min() and video.max() <= 1
    assert callable(scope["inflate"]) and isinstance(scope["video_vae"], CausalVAE)
    if "summary" in scope:  # the dataset snippet: one 17-frame clip, cut once, encoded
        assert (scope["summary"].done, scope["summary"].failed) == (1, 0)
        assert (tmp_path / "latents" / "cockatoo_000000.safetensors").is_file()
