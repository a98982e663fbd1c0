/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark: a 4-byte MMIO read (a guest-physical address outside RAM, which rvmm-run
 * answers with all ones) and its exit to userspace and back, repeated on one page.
 * Prints "mmio ticks/op: N".
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set DEV, 0xfed00000
	.set N, 2000
_start:
	mov	ebx, DEV
	mov	eax, [rbx]		/* warm: the first access walks the guest's tables */
	call	tsc_start
	mov	r13d, N
1:	mov	eax, [rbx + 4]
	dec	r13d
	jnz	1b
	mov	rcx, N
	call	tsc_per_op
	mov	r12, rax
	lea	rsi, [rip + msg]
	call	puts
	mov	rax, r12
	call	print_ticks
	jmp	done

	.include "lib.inc"

	.data
msg:	.asciz	"mmio"
