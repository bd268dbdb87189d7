"""Put this directory first on PYTHONPATH of `limpq run` (Ray workers inherit it): every fine-tuning step
appends the loss, fc.weight_quant.step.8 before and after, its gradient and the lr to $FC_TRACE
(docs/results.md, "The classifier's step still crosses zero")."""
import functools, importlib.abc, importlib.util, os, sys

class TraceFcStep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "orchestrator.train.steps":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module
        def exec_module(module):
            execute(module)
            original = module.plain_step
            @functools.wraps(original)
            def traced(model, images, labels, **kwargs):
                inner = getattr(model, "module", model)
                quant = inner.fc.weight_quant
                before = float(quant.step["8"]) if bool(quant.initialized) else None
                result = original(model, images, labels, **kwargs)
                grad = quant.step["8"].grad
                with open(os.environ.get("FC_TRACE", "fc_trace.txt"), "a") as out:
                    out.write(f"loss {result['loss']:.3f} step {before} -> {float(quant.step['8']):.5f} "
                              f"grad {None if grad is None else float(grad):.4g} max|w|/127 {float(inner.fc.weight.abs().max())/127:.5f} "
                              f"lr {kwargs['optimizer'].param_groups[0]['lr']:.4g}\n")
                return result
            module.plain_step = traced
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, TraceFcStep())
