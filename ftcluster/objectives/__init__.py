"""What a batch's loss is: the Objective protocol the loop and evaluation use, and sft, dpo, reward and grpo."""
