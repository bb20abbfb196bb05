def test_tiny_run_has_checkpoint(tiny_run):
    from minigpt4qwen.runs import latest_checkpoint

    ckpt = latest_checkpoint(tiny_run)
    assert ckpt is not None and ckpt.name == "step-00000004"
