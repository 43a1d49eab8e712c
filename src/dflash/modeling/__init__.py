"""Models: the DFlash drafter, target loading, the training objective and the LR schedule."""
