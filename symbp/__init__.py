"""symbp"""
