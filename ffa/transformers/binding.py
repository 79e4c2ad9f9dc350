"""What `enable` attaches to a model and to each of its attention modules: one Binding, found
through `binding_of` / `find_binding` by the cache, the attention function and the loop."""

ATTRIBUTE = "_ffa_binding"


def refuse(model_type, feature):
    """The error for a model that needs what FFA cannot do, naming the feature."""
    raise ValueError(f"FFA cannot run this model ({model_type}): {feature}")


class Binding:
    """The attention modules of an enabled model (of transformers' `model_type`) by layer index
    (`attention`: every layer but, in a hybrid model, its linear-attention and recurrent ones),
    its number of layers, query heads per kv head, the previous attention implementations (of the
    model, "", and of each sub-model), the enable() options, and the cache in use (set by
    FFACache.update while a forward runs)."""

    def __init__(self, model_type, attention, num_layers, group, previous, own_attention, compile, decode_loop,
                 kernel="ffa"):
        self.model_type = model_type
        self.attention = dict(sorted(attention.items()))
        self.modules = list(self.attention.values())
        self.group = group
        self.num_layers = num_layers
        self.previous = previous
        self.own_attention = own_attention  # modules wrapped through their `_attn` (GPT-J)
        self.cache = None
        self.configure(compile, decode_loop, kernel)

    def configure(self, compile, decode_loop, kernel="ffa"):
        """The options of enable(); forgets what the previous options built."""
        self.compile = compile
        self.decode_loop = decode_loop
        self.kernel = kernel  # FastForwardAttn's kernel= for the caches made from now on
        self.generate_cache = None    # the cache generate made, reused by the next call
        self.decode_step = None       # loop.DecodeStep (and its CUDA graph) over that cache
        self.compiled_forward = None  # the model under torch.compile, for the decode loop

    def attach(self, model):
        for obj in (model, *self.modules):
            setattr(obj, ATTRIBUTE, self)

    def detach(self, model):
        for obj in (model, *self.modules):
            delattr(obj, ATTRIBUTE)


def find_binding(obj):
    """The Binding of an enabled model or of one of its attention modules, else None."""
    return getattr(obj, ATTRIBUTE, None)


def binding_of(model):
    binding = find_binding(model)
    if binding is None:
        raise ValueError("model was not passed through ffa.transformers.enable")
    return binding
