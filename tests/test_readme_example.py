"""The README's FastGuidedSampler example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Drop-in `FastGuidedSampler`"


def readme_example() -> str:
    text = README.read_text()
    assert SECTION in text, f"README lacks the section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "expected exactly one python block in the sampler section"
    return blocks[0]


def test_readme_sampler_example_runs(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    batch = namespace["batch"]
    assert batch.observations.shape == (256, 10, 11) and batch.actions.shape == (256, 10, 3)
    assert namespace["tuner"].scale.item() != 0.005  # the tuner moved
    assert "torch.Size([256, 10, 11])" in capsys.readouterr().out
