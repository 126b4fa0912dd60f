"""An imported pretrained generalist served by the inference server: its chat template and
stop token are what GetModelInfo reports, and it streams as any version does."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shiftable_lib import jobs
from shiftable_lib.config import Settings
from sma.v1 import inference_pb2
from tests.hf_models import TEMPLATE, hf_model, save_hf
from tests.services.inference.conftest import running_core, serving


def test_the_server_reports_and_serves_an_imported_version(tmp_path: Path, tokenizer) -> None:
    folder = save_hf(hf_model("qwen2", tokenizer.get_vocab_size()), tokenizer, tmp_path / "qwen")
    settings = Settings(home=tmp_path / "home")
    version = jobs.import_base(settings, folder).version

    async def run() -> tuple[inference_pb2.GetModelInfoResponse, list]:
        async with running_core(settings.models_dir, version) as core, serving(core) as stub:
            info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
            request = inference_pb2.GenerateRequest(prompt="the list", max_new_tokens=4)
            replies = [r async for r in stub.Generate(request)]
            return info, replies

    info, replies = asyncio.run(run())
    assert info.version_id == version and info.chat_template == TEMPLATE
    assert info.eos_token == "<|endoftext|>"
    assert info.n_layer == 2 and info.d_model == 32 and info.context == 64
    assert replies[-1].finish_reason in (
        inference_pb2.FINISH_REASON_LENGTH,
        inference_pb2.FINISH_REASON_EOS,
    )
    assert sum(len(r.token_ids) for r in replies) >= 1
