"""edge-lora"""
