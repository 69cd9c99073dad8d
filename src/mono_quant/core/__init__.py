"""Framework-free quantization core that uses plain torch and no Lightning."""
