#include <stdio.h>
#include <time.h>
int target(int x);
__asm__(".text\n.globl target\n.type target,@function\ntarget:\n endbr64\n push %rbp\n mov %rsp,%rbp\n lea 1(%rdi),%eax\n pop %rbp\n ret\n.size target,.-target\n");
int main(void) {
    long n = 200000; struct timespec a, b; int s = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) s = target(s);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f ns per call (%d)\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n, s);
    return 0;
}
