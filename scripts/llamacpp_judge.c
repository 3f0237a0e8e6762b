// llama.cpp as the judge of our GGUF files: a small C program against libllama (built by scripts/build_llamacpp.sh),
// so that scripts/check_gguf_llamacpp.py needs no Python bindings.
//
//   llamacpp_judge logits MODEL.gguf OUT.f32 [--lora ADAPTER.gguf] ID...
//       llama.cpp's logits at every position of the ids (raw float32, n_ids × n_vocab, row-major); with --lora the
//       LoRA GGUF is applied over the model at scale 1, as `llama-cli --lora` does.
//   llamacpp_judge greedy MODEL.gguf N ID...
//       N tokens of greedy decoding after the ids, printed space-separated (stops early at an end-of-generation token).
//   llamacpp_judge perplexity MODEL.gguf TEXT N_CTX
//       llama-perplexity's measure: the text tokenized by the model's vocabulary (with BOS when the model adds it), cut
//       into chunks of N_CTX tokens (the first of each replaced by BOS), each scored on its second half: exp of the
//       mean negative log-likelihood of token j + 1 given 0…j, for j from N_CTX/2 to N_CTX − 2. Prints
//       "tokens T chunks C perplexity P".
//   llamacpp_judge quantize IN.gguf OUT.gguf FTYPE
//       llama-quantize's quantization (llama_model_quantize, no importance matrix) to llama_ftype FTYPE
//       (2 Q4_0, 7 Q8_0, 15 Q4_K_M, 17 Q5_K_M, 18 Q6_K).
// Build: cc -O2 llamacpp_judge.c -I LLAMA/include -I LLAMA/ggml/include -L BUILD/bin -lllama -lggml -lggml-base -lm
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * data) {
    (void) data;
    if (level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

static struct llama_model * load(const char * path) {
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(path, mp);
    if (!model) { fprintf(stderr, "%s: llama.cpp could not load the model\n", path); exit(1); }
    return model;
}

static struct llama_context * context(struct llama_model * model, int n_ctx, const char * path) {
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx; cp.n_batch = n_ctx; cp.n_ubatch = n_ctx; cp.n_threads = 2; cp.n_threads_batch = 2;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "%s: no context\n", path); exit(1); }
    return ctx;
}

// Decodes ids[0..n) at positions 0..n, every position's logits kept.
static void decode_all(struct llama_context * ctx, const llama_token * ids, int n, const char * path) {
    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "%s: llama_decode failed\n", path); exit(1); }
    llama_batch_free(batch);
}

static int logits(int argc, char ** argv) {
    if (argc < 4) return 2;
    const char * lora = NULL;
    int first = 3;
    if (argc > 5 && strcmp(argv[3], "--lora") == 0) { lora = argv[4]; first = 5; }
    int n = argc - first;
    llama_token * ids = malloc(sizeof(llama_token) * n);
    for (int i = 0; i < n; i++) ids[i] = atoi(argv[first + i]);
    struct llama_model * model = load(argv[1]);
    struct llama_context * ctx = context(model, n < 64 ? 64 : n, argv[1]);
    if (lora) {
        struct llama_adapter_lora * adapter = llama_adapter_lora_init(model, lora);
        if (!adapter) { fprintf(stderr, "%s: llama.cpp could not load the LoRA adapter\n", lora); return 1; }
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &adapter, 1, &scale) != 0) { fprintf(stderr, "%s: could not apply\n", lora); return 1; }
    }
    decode_all(ctx, ids, n, argv[1]);
    int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * f = fopen(argv[2], "wb");
    if (!f) { perror(argv[2]); return 1; }
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), vocab, f);
    fclose(f);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

static int argmax(const float * x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static int greedy(int argc, char ** argv) {
    if (argc < 4) return 2;
    int steps = atoi(argv[2]), n = argc - 3;
    struct llama_model * model = load(argv[1]);
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    struct llama_context * ctx = context(model, 512, argv[1]);
    llama_token * ids = malloc(sizeof(llama_token) * n);
    for (int i = 0; i < n; i++) ids[i] = atoi(argv[3 + i]);
    decode_all(ctx, ids, n, argv[1]);
    llama_token next = argmax(llama_get_logits_ith(ctx, n - 1), n_vocab);
    for (int s = 0; s < steps; s++) {
        printf(s ? " %d" : "%d", next);
        if (llama_vocab_is_eog(vocab, next)) break;
        struct llama_batch batch = llama_batch_get_one(&next, 1);  // at the next position of the sequence
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "%s: llama_decode failed\n", argv[1]); return 1; }
        next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
    }
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

static int perplexity(int argc, char ** argv) {
    if (argc != 4) return 2;
    int n_ctx = atoi(argv[3]);
    FILE * f = fopen(argv[2], "rb");
    if (!f) { perror(argv[2]); return 1; }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char * text = malloc(size + 1);
    if (fread(text, 1, size, f) != (size_t) size) { perror(argv[2]); return 1; }
    text[size] = 0;
    fclose(f);
    struct llama_model * model = load(argv[1]);
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    int add_bos = llama_vocab_get_add_bos(vocab);
    int cap = (int) size + 16;
    llama_token * tokens = malloc(sizeof(llama_token) * cap);
    int n_tokens = llama_tokenize(vocab, text, (int) size, tokens, cap, add_bos, false);
    if (n_tokens < 0) { fprintf(stderr, "tokenize failed\n"); return 1; }
    int chunks = n_tokens / n_ctx;
    if (chunks < 1) { fprintf(stderr, "%s: %d tokens, fewer than one chunk of %d\n", argv[2], n_tokens, n_ctx); return 1; }
    struct llama_context * ctx = context(model, n_ctx, argv[1]);
    double nll = 0;
    long count = 0;
    llama_token * chunk = malloc(sizeof(llama_token) * n_ctx);
    for (int c = 0; c < chunks; c++) {
        memcpy(chunk, tokens + (long) c * n_ctx, sizeof(llama_token) * n_ctx);
        if (add_bos) chunk[0] = llama_vocab_bos(vocab);
        llama_memory_clear(llama_get_memory(ctx), true);
        decode_all(ctx, chunk, n_ctx, argv[1]);
        for (int j = n_ctx / 2; j < n_ctx - 1; j++) {
            const float * l = llama_get_logits_ith(ctx, j);
            float top = l[0];
            for (int v = 1; v < n_vocab; v++) if (l[v] > top) top = l[v];
            double sum = 0;
            for (int v = 0; v < n_vocab; v++) sum += exp((double) l[v] - top);
            nll += log(sum) + top - l[tokens[(long) c * n_ctx + j + 1]];
            count++;
        }
    }
    printf("tokens %d chunks %d perplexity %.6f\n", n_tokens, chunks, exp(nll / count));
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

static int quantize(int argc, char ** argv) {
    if (argc != 4) return 2;
    struct llama_model_quantize_params qp = llama_model_quantize_default_params();
    qp.ftype = (enum llama_ftype) atoi(argv[3]);
    qp.nthread = 2;
    if (llama_model_quantize(argv[1], argv[2], &qp) != 0) { fprintf(stderr, "%s: llama_model_quantize failed\n", argv[1]); return 1; }
    return 0;
}

int main(int argc, char ** argv) {
    if (argc < 2) goto usage;
    llama_log_set(quiet, NULL);
    llama_backend_init();
    int rc = 2;
    if (strcmp(argv[1], "logits") == 0) rc = logits(argc - 1, argv + 1);
    else if (strcmp(argv[1], "greedy") == 0) rc = greedy(argc - 1, argv + 1);
    else if (strcmp(argv[1], "perplexity") == 0) rc = perplexity(argc - 1, argv + 1);
    else if (strcmp(argv[1], "quantize") == 0) rc = quantize(argc - 1, argv + 1);
    llama_backend_free();
    if (rc != 2) return rc;
usage:
    fprintf(stderr, "usage: %s logits MODEL OUT.f32 [--lora ADAPTER] ID... | greedy MODEL N ID... | perplexity MODEL TEXT N_CTX | quantize IN OUT FTYPE\n", argv[0]);
    return 2;
}
