"""Reward models behind one interface, and the scoring run for large generation pools."""

from .base import RewardModel, available_rewards, load_reward, load_rewards, load_training_reward, register_reward

__all__ = ["RewardModel", "available_rewards", "load_reward", "load_rewards", "load_training_reward", "register_reward"]
