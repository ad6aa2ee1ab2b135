"""push_to_hub through a local stand-in for the Hub API, and the model cards."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM
from transformers.utils import hub as transformers_hub

import hf_yoco
from hf_yoco.hub import create_model_card

pytestmark = pytest.mark.transformers_compat

YOCO = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
BLOCK = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, block_length=4, num_block_decoder_layers=2,
    num_token_decoder_layers=2, num_attention_heads=4,
)  # fmt: skip


class FakeHubApi:
    """Receives `create_repo` / `create_commit` like the Hub and writes the committed files under `root`."""

    def __init__(self, root):
        self.root = root
        self.commits = []

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, **kwargs):
        pass

    def file_exists(self, repo_id, filename, **kwargs):
        return (self.root / repo_id / filename).exists()

    def hf_hub_download(self, repo_id, filename, **kwargs):
        return str(self.root / repo_id / filename)

    def create_commit(self, repo_id, operations, **kwargs):
        self.commits.append([op.path_in_repo for op in operations])
        for op in operations:
            destination = self.root / repo_id / op.path_in_repo
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, destination)
        return SimpleNamespace(commit_url=(self.root / repo_id).as_uri(), oid="0" * 40, pr_url=None)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    api = FakeHubApi(tmp_path / "hub")
    monkeypatch.setattr(transformers_hub, "_hf_api", api)
    return api


@pytest.mark.parametrize("config", [hf_yoco.YocoConfig(**YOCO), hf_yoco.BlockTransformerConfig(**BLOCK)])
def test_push_to_hub_uploads_weights_config_code_and_card(fake_hub, config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.push_to_hub("someone/tiny-model", commit_message="first upload")
    uploaded = set(fake_hub.commits[-1])
    assert {"config.json", "model.safetensors", "README.md", "modeling_common.py"} <= uploaded
    assert any(name.startswith("configuration_") for name in uploaded)
    repo = fake_hub.root / "someone/tiny-model"
    card = ModelCard.load(repo / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "hf_yoco" in card.data.tags
    assert 'from_pretrained("someone/tiny-model", trust_remote_code=True)' in card.text
    reloaded = AutoModelForCausalLM.from_pretrained(repo).eval()
    ids = torch.randint(1, 64, (1, 9))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)

    # A card already in the repository is kept.
    (repo / "README.md").write_text("---\nlicense: apache-2.0\n---\n# My own card\n")
    model.push_to_hub("someone/tiny-model")
    assert "# My own card" in (repo / "README.md").read_text()


def test_model_card_contents(tmp_path):
    model = AutoModelForCausalLM.from_config(
        hf_yoco.YocoConfig(**YOCO, num_key_value_heads=2, self_decoder_type="sliding_window", sliding_window=16)
    )
    card = create_model_card(
        model,
        "me/yoco-tiny",
        base_model="HuggingFaceTB/SmolLM2-135M",
        datasets=["shakespeare"],
        eval_results={"perplexity": 12.5},
        eval_dataset="shakespeare",
        training_summary="200 steps on Shakespeare.",
        tags=["tiny"],
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M" and data["datasets"] == ["shakespeare"]
    assert {"yoco", "tiny"} <= set(data["tags"])
    assert data["model-index"][0]["results"][0]["metrics"][0] == {"type": "perplexity", "value": 12.5}
    text = loaded.text
    assert "sliding-window attention over the last 16 tokens" in text and "200 steps on Shakespeare." in text
    # 32K context: one global K/V (2 * 2 heads * 8 dims * 2 bytes per token) + 2 windows of 15 tokens vs 4 layers.
    per_token = 2 * 2 * 8 * 2
    ours, llama = 32768 * per_token + 2 * 15 * per_token, 32768 * per_token * 4
    assert f"{llama / ours:.1f}x smaller" in text
    with pytest.raises(ValueError, match="eval_dataset"):
        create_model_card(model, eval_results={"perplexity": 1.0})


def test_model_card_rejects_other_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4))  # fmt: skip
    with pytest.raises(ValueError, match="model_type"):
        create_model_card(llama)
