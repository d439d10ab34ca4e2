"""Evaluation: AR / FIM / middle-only loss and HumanEval infilling with execution."""
