"""The registries drive the docs and cover the pinned transformers release; the public API is pinned."""

import ast
import subprocess
import sys
from pathlib import Path

import transformers

import gdn_intervene as gi
from gdn_intervene import _docs
from gdn_intervene._compat import modeling_module
from gdn_intervene.families import FAMILIES, UNSUPPORTED, supported_class_names

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_is_pinned():
    assert sorted(gi.__all__) == sorted(
        [
            "patch",
            "unpatch",
            "patched",
            "patch_on_load",
            "from_pretrained",
            "gdn_layers",
            "site_module",
            "intervene",
            "state_at",
            "capture",
            "Capture",
            "SITES",
            "Site",
            "FAMILIES",
            "family_for",
            "SiteValueError",
            "NativeFallbackWarning",
            "UnsupportedVersionError",
            "gdn_layer",
            "GDNLayer",
            "StateFiring",
            "CheckpointEditError",
        ]
    )
    assert all(hasattr(gi, name) for name in gi.__all__)


def test_readme_tables_are_generated_from_the_registries():
    text = (ROOT / "README.md").read_text()
    assert _docs.render(text) == text, "README tables are stale: run python -m gdn_intervene._docs"
    for s in gi.SITES:
        assert f"| `{s.name}`" in text


# Delta-rule kernels, by the names transformers' modeling files bind them to: the gated delta
# rule (GDN) and Kimi Delta Attention (per-channel decay).
KERNEL_MARKERS = ("gated_delta_rule", "kimi_delta_attention")


def _gdn_like_classes() -> set[str]:
    """Classes in transformers' modeling files whose methods call a delta-rule kernel."""
    found = set()
    for path in Path(transformers.__file__).parent.glob("models/*/modeling_*.py"):
        src = path.read_text()
        if not any(k in src for k in KERNEL_MARKERS):
            continue
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ClassDef):
                # module functions (5.15 on) or attributes bound in __init__ (`self.chunk_gated_delta_rule`, before)
                calls = {
                    getattr(n.func, "id", getattr(n.func, "attr", ""))
                    for n in ast.walk(node)
                    if isinstance(n, ast.Call)
                }
                if any(k in c for c in calls for k in KERNEL_MARKERS):
                    found.add(node.name)
    return found


def test_every_gdn_class_of_the_pinned_release_is_supported_or_listed():
    found = _gdn_like_classes()
    assert found, "scanner found no GDN class: the scan itself is broken"
    present = {name for fam in FAMILIES for mod, name in fam.classes if getattr(modeling_module(mod), name, None)}
    assert present and present <= found  # every supported class this release has is found
    unknown = found - set(supported_class_names()) - set(UNSUPPORTED)
    assert not unknown, f"GDN-like classes neither supported nor listed in UNSUPPORTED: {sorted(unknown)}"


def test_import_has_no_side_effects():
    code = "import sys, gdn_intervene; print(sorted(m for m in ('nnsight', 'pyvene', 'matplotlib', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_install_cap_is_the_newest_tested_release():
    """pyproject.toml, `_compat.TESTED` and the README name the same transformers range: the
    install resolves to a tested release on any day."""
    import re

    from gdn_intervene import _compat

    spec = _compat.install_spec()
    assert f'"{spec}"' in (ROOT / "pyproject.toml").read_text()
    newest = _compat.TESTED["transformers"][1]
    assert spec.endswith(f"<{newest.split('.')[0]}.{int(newest.split('.')[1]) + 1}")
    readme = (ROOT / "README.md").read_text()
    assert spec in readme and re.search(rf"\b{re.escape(newest.rsplit('.', 1)[0])}\.x\b", readme)
